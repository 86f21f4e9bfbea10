"""Old name of `sparsejax.nn` (the Flax layers)."""  # TODO(lead): remove alias

from sparsejax.nn import *  # pylint: disable=wildcard-import,unused-wildcard-import
from sparsejax.nn import __all__ as __all__
