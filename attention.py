"""Attention under the LM-AFs mask (causal, same document, sliding window): FlexAttention on CUDA, SDPA with
the same dense mask elsewhere (FlexAttention has no CPU backward). Both compute the same function."""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Attention masks: causal, same document, sliding window


def documentIds(tokens, tokenDocSep):
    """[..., T] -> document index of each position; a separator starts a new document."""
    if tokenDocSep < 0:
        return torch.zeros_like(tokens)
    return torch.cumsum((tokens == tokenDocSep).to(torch.int32), dim=-1)


def denseAttentionMask(docs, contextSize):
    """Boolean [nB, 1, T, T]: True where query q may attend key k."""
    T = docs.shape[-1]
    q = torch.arange(T, device=docs.device)[:, None]
    k = torch.arange(T, device=docs.device)[None, :]
    allowed = (k <= q) & (q - k < contextSize)
    return (allowed[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


def flexBlockMask(docs, contextSize, blockSize):
    from torch.nn.attention.flex_attention import create_block_mask

    def maskMod(b, h, q, k):
        return (k <= q) & (q - k < contextSize) & (docs[b, q] == docs[b, k])

    nB, T = docs.shape
    return create_block_mask(maskMod, nB, None, T, T, device=docs.device, BLOCK_SIZE=blockSize)


class AttentionKernel:
    """Scaled dot-product attention under the LM-AFs mask, by FlexAttention or by SDPA with a dense mask.

    Both compute the same function; FlexAttention is the fast path on CUDA (it has no CPU backward).
    """

    def __init__(self, implementation, contextSize, blockSize):
        if implementation not in ("flex", "sdpa"):
            raise ValueError(f"attention implementation must be 'flex' or 'sdpa', got {implementation!r}")
        self.implementation = implementation
        self.contextSize, self.blockSize = contextSize, blockSize
        if implementation == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            self.flexAttention = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() \
                else flex_attention

    def mask(self, docs):
        if self.implementation == "flex":
            return flexBlockMask(docs, self.contextSize, self.blockSize)
        return denseAttentionMask(docs, self.contextSize)

    def __call__(self, q, k, v, mask):  # [nB, H, T, hd]
        if self.implementation == "flex":
            return self.flexAttention(q, k, v, block_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
