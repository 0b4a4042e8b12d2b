from compressor.replaceme.prune import *  # noqa: F401,F403
from compressor.replaceme.prune import naive_drop, prune, quality  # noqa: F401
