"""pneumoseg: pneumothorax segmentation for the SIIM-ACR chest X-ray data."""

import os

# albumentations checks PyPI for updates at import; these machines (and many clusters) are
# offline, where the check only costs a timeout. Set before anything imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
