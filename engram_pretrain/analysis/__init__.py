"""Analysis: parameter accounting, CKA, LogitLens, experiment tables and figures."""
