"""``repskip compare``: several models' analyses and verify reports, overlaid view by view.

Inputs are grouped by the model they describe (an analysis by its model's fingerprint, a
verify report by its base model's), so a model's analysis and its reports at several k make
one series. Each view is drawn when every series has it: the layer similarity curve against
relative depth, the layer x layer matrices side by side, the token-distance profile, and
retention against the share of layers removed.
"""

from .load import Series, common_views, load_series
from .figures import write_figures
from .table import summary

__all__ = ["Series", "common_views", "load_series", "summary", "write_figures"]
