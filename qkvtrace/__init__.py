"""qkvtrace: train a translation Transformer and trace its Q, K, V and post-attention vectors across checkpoints."""

from qkvtrace.errors import QkvtraceError
from qkvtrace.table import VectorTable, load_vectors

__all__ = ["QkvtraceError", "VectorTable", "load_vectors"]
__version__ = "0.1.0"
