"""matplotlib for every plot fitscale writes (sweep reports, run reports): one place on the ground floor."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only); ImportError says which extra installs it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'fitscale[sweep]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
