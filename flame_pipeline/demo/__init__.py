"""`flame demo`: the whole pipeline on the embedded default (SPEC §9), its artifacts and its report."""
