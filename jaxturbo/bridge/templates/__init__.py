"""Files copied verbatim into exported HF directories (loaded by transformers, not by jaxturbo).

ladder_llama: `configuration_ladder_llama.py` + `modeling_ladder_llama.py`, the
`trust_remote_code` implementation of Ladder-Residual Llama (see jaxturbo.bridge.ladder_hf).
"""
