"""Reports of attribution results.

- :func:`html`: one self-contained static HTML page (inline CSS, SVG and base64 PNG
  images; no network) with each target's top proponents and opponents rendered as the
  data is, score distributions, suspected mislabels, the run's settings and the LDS.
  Needs nothing beyond numpy (Pillow, when installed, encodes the PNGs).
- :func:`plot_top_attributions`: a PNG grid of image attributions (needs matplotlib:
  ``pip install fasttrak[viz]``).

See docs/report.md.
"""

from fasttrak.report.figures import plot_top_attributions
from fasttrak.report.page import html

__all__ = ["html", "plot_top_attributions"]
