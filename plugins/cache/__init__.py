"""The response cache: tiers in profile order behind one gateway middleware
(hook plugin ``cache``)."""
