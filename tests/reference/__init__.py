"""Independent re-implementations that fitscale's fast paths are checked against."""
