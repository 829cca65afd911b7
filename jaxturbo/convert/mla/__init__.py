"""GQA -> MLA conversion (CARE, Zhou et al., ICLR 2026).

calibrate   per-layer covariance of the attention input over calibration text
rope_select which (kv head, frequency) pairs stay rotary in the shared rope key
factorize   low-rank K/V factorisation methods (svd-joint, svd, care) and rank allocation
convert     builds the MLA params and config, with KV budget accounting
evaluate    perplexity of an MLA model
heal        KL distillation of the converted model toward the original
"""

from jaxturbo.convert.mla.convert import ConversionResult, convert_to_mla

__all__ = ["ConversionResult", "convert_to_mla"]
