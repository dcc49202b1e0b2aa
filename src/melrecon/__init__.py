"""melrecon: memory-efficient learning for high-dimensional unrolled MRI reconstruction."""

from melrecon import cpu_threads as _cpu_threads

# before anything imports torch: OpenMP threads that sleep instead of spinning when other
# processes share the cores (melrecon.cpu_threads; the user's OMP_* settings win)
_cpu_threads.configure()

__version__ = "0.1.0"
