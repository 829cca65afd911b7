"""GQA -> MLA conversion quality and MLA decode speed (RESULTS.md)."""
