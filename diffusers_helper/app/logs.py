"""What the log shows: our decisions at the chosen level, and nothing from optional libraries the user did
not enable.

diffusers imports torchao and bitsandbytes whenever they are installed (its quantizers look them up at import),
and their import-time warnings (missing CUDA extensions, no Triton on a CPU machine, a torch deprecation)
would read as problems of this app. They are raised to errors-only unless that library is in use.
"""

from __future__ import annotations

import logging

from ..config.formats import BNB_BITS, TORCHAO_BITS

# library -> loggers whose import-time chatter concerns only that library
OPTIONAL_LOGGERS = {
    "torchao": ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"),
    "bitsandbytes": ("bitsandbytes",),
}
# progress chatter of libraries we drive: the log says what we decided instead
QUIET_INFO = ("httpx",)


def configure_logging(level: str = "INFO", enabled: set[str] | frozenset = frozenset(),
                      fmt: str = "%(asctime)s %(name)s: %(message)s") -> None:
    """Set up the root logger (stderr), quieting the optional libraries not in `enabled`."""
    logging.basicConfig(level=getattr(logging, level), format=fmt)
    for name in QUIET_INFO:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    for library, loggers in OPTIONAL_LOGGERS.items():
        if library not in enabled:
            for name in loggers:
                logging.getLogger(name).setLevel(logging.ERROR)


def enabled_libraries(weight_format: str) -> set[str]:
    """The optional libraries a weight format uses: torchao for its integer formats, bitsandbytes for its own."""
    if weight_format in TORCHAO_BITS:
        return {"torchao"}
    if weight_format in BNB_BITS:
        return {"bitsandbytes"}
    return set()
