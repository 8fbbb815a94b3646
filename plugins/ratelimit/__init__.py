"""Rate limits and quotas per principal: token buckets in memory or Redis (hook plugin
``rate_limits``)."""
