from compressor.sweep.run import *  # noqa: F401,F403
from compressor.sweep.run import __all__  # noqa: F401
