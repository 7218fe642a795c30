"""``cmd-dist tune``: search CMD's b1, b2, eta (or any config key) on clean validation data with Ray Tune."""
