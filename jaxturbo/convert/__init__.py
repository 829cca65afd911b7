"""Model conversions: GQA -> MLA (`jaxturbo.convert.mla`, CARE) and standard -> hybrid
Ladder-Residual (`jaxturbo.convert.ladderize`)."""
