"""The relpos_ref test suite; mirrors the package (one folder per subpackage, one file per module)."""
