"""CLIP models for VL-LTR: the open_clip encoders of Eq. (1), their weights, tokens and embeddings.

    pretrained_cfg(backbone, tag)              how the weights of --pretrained TAG were trained (QuickGELU, mean, std)
    create_clip(backbone, image_size, tag)     a randomly initialised open_clip CLIP built as TAG's weights need it
    clip_preprocess(backbone, tag)             TAG's image statistics and resizing, for images.make_transform
    load_clip_file(model, path)                local weights: a state dict, or one of OpenAI's TorchScript archives
    pretrained_weights(backbone, tag)          open_clip's cached weights of TAG, or one download
    tokenize_exact(sentences, L)               open_clip's BPE tokens, and which sentences did not fit
    tokenize_corpus(corpus, L, cache_dir)      a dataset's class corpora tokenised once, cached between runs
    encode_texts / encode_images               normalised embeddings of a corpus / a loader, in chunks
    pack_sentences, encode_text_packed         a training batch's sentences through the text tower in one pass
    channels_last, cast_frozen_weights         the layouts and casts a GPU wants of the step's models, the same maths

The stages build and load their CLIPs through this file; engine.py holds the training machinery.
"""
import contextlib
import functools
import hashlib
import inspect
import logging
import math
import os
import socket
import urllib.parse
import urllib.request
import warnings
import zipfile
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import ResidualAttentionBlock
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from util.engine import autocast, eval_precision, host_to_device
from util.files import atomic_write
from util.errors import DataError, warn
from util.progress import progress


# The small CLIP of the shapes_lt world (docs/design.md §4, trained in shapes_lt.py): a ViT on 32 px images in 8 px
# patches (a 4 x 4 grid: 17 tokens, a quarter of what 4 px patches make, and a step 2.5 times as fast) and a
# 2-layer text transformer.
TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))

# --pretrained: which weights, and so which settings they were trained with. The paper's are OpenAI's.
OPENAI_TAG = "openai"
# The settings of OpenAI's weights (open_clip's 'openai' entries say the same for every model): QuickGELU, their
# mean and std, bicubic resizing of the short side. Also what a local file of a model open_clip holds no 'openai'
# entry for is taken to be, as the code did before tags were read.
OPENAI_CFG = dict(quick_gelu=True, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
                  interpolation="bicubic", resize_mode="shortest")
# shapes-tiny has one tag of its own: the world's stand-in is trained here (shapes_lt.train_clip_standin) with
# open_clip.CLIP's nn.GELU and on OpenAI's mean and std.
STANDIN_TAG = "standin"
STANDIN_CFG = {**OPENAI_CFG, "quick_gelu": False}


def default_tag(backbone):
    """The --pretrained a run uses when none is given: OpenAI's (the paper's), the stand-in's on shapes-tiny."""
    return STANDIN_TAG if backbone == "shapes-tiny" else OPENAI_TAG


def pretrained_cfg(backbone, tag):
    """open_clip's pretrained config of (backbone, tag) (open_clip.get_pretrained_cfg): where the weights are and
    how they were trained, {quick_gelu, mean, std, interpolation, resize_mode, hf_hub / url / file}. 'openai' for a
    model open_clip holds no OpenAI weights for (a local file of them, --clip-weights) gets OpenAI's settings."""
    if backbone == "shapes-tiny":
        if tag != STANDIN_TAG:
            raise DataError(f"--backbone shapes-tiny has one --pretrained, {STANDIN_TAG} (the shapes_lt world's "
                            f"stand-in); drop --pretrained {tag}")
        return STANDIN_CFG
    cfg = open_clip.get_pretrained_cfg(backbone, tag)
    if cfg:
        return cfg
    if tag == OPENAI_TAG:
        return OPENAI_CFG
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    raise DataError(f"open_clip has no --pretrained {tag} for --backbone {backbone}; its tags: "
                    f"{', '.join(tags) or 'none'} (open_clip.list_pretrained() lists every model and tag)")


def create_clip(backbone, image_size, tag=None):
    """A randomly initialised open_clip CLIP: RN50, ViT-B-16, ... or the shapes-tiny stand-in, with the activation
    the weights of --pretrained `tag` (default: default_tag) were trained with."""
    cfg = pretrained_cfg(backbone, tag or default_tag(backbone))
    if backbone == "shapes-tiny":
        cfg_tiny = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": image_size}}
        return open_clip.CLIP(**cfg_tiny, quick_gelu=cfg["quick_gelu"])
    if backbone not in open_clip.list_models():
        raise DataError(f"unknown --backbone {backbone!r}; use RN50, ViT-B-16 or another open_clip model name")
    check_towers(backbone)
    # OpenAI's, DFN's and MetaCLIP's weights were trained with QuickGELU, LAION's and DataComp's with nn.GELU; the
    # other activation loads the same weights without complaint and computes something else. open_clip's own
    # create_model only warns about a mismatch, so the tag's value is passed as the model's (it overrides the
    # model config's, e.g. RN50's plain config is nn.GELU).
    with without_log_line("No pretrained weights loaded"):   # the weights come next, from load_clip_file
        return open_clip.create_model(backbone, pretrained=None, force_image_size=image_size,
                                      quick_gelu=bool(cfg.get("quick_gelu", False)))


def check_towers(backbone):
    """Refuse, in one line, an open_clip model whose towers or outputs VL-LTR cannot use. The method needs: one
    (B, D) embedding per image from the image tower alone (lgr.Recognizer keeps only that tower); a text tower
    that reads CLIP's BPE tokens (data.corpus_tokens tokenises every corpus once with them); and a model trained
    with the softmax contrastive loss, whose logit_scale is the tau of Eq. (2), (3) and AnSS. Read from the
    model's config, before anything is built."""
    cfg = open_clip.get_model_config(backbone)
    text = cfg.get("text_cfg", {})
    missing = []
    if "multimodal_cfg" in cfg:
        missing.append("a plain image embedding (CoCa's image tower also returns its tokens for the caption decoder)")
    if text.get("hf_tokenizer_name") or text.get("hf_model_name"):
        missing.append(f"a text tower that reads CLIP's BPE tokens (it reads "
                       f"{text.get('hf_tokenizer_name') or text.get('hf_model_name')}'s)")
    elif text.get("vocab_size", 49408) != 49408:
        missing.append(f"CLIP's BPE vocabulary of 49408 tokens (its text tower has {text['vocab_size']})")
    if cfg.get("init_logit_bias") is not None:
        missing.append("softmax contrastive training (it has a logit_bias: a sigmoid loss, as SigLIP's)")
    if missing:
        raise DataError(f"--backbone {backbone} cannot be used by VL-LTR: it lacks {'; '.join(missing)}; choose a "
                        f"CLIP model (RN50, ViT-B-16, ViT-L-14, EVA02-B-16, ...)")


def clip_preprocess(backbone, tag=None):
    """The image settings the weights of `tag` were trained with, as images.make_transform's keywords:
    {mean, std, interpolation ('bicubic' | 'bilinear'), resize_mode ('shortest' | 'squash')}. OpenAI's: their
    mean and std, bicubic, short side; ViT-L-14 laion2b_s32b_b82k: mean = std = 0.5; SigLIP's: squash."""
    cfg = {**OPENAI_CFG, **pretrained_cfg(backbone, tag or default_tag(backbone))}   # a cfg may leave some out
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")}


@contextlib.contextmanager
def without_log_line(prefix):
    """Drop the root-logger lines starting with `prefix` inside the block (open_clip logs through the root
    logger; its "Model initialized randomly." reads as a failure when our weights are loaded right after)."""
    drop = lambda record: not record.getMessage().startswith(prefix)
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def context_length(model):
    """The text tower's context L (77 for OpenAI's; CustomTextCLIP keeps its tower in .text, CLIP flattens it)."""
    return model.context_length


def embed_dim(model):
    """D, the width of both embeddings: the text projection's output ((W, D) parameter, or a Linear layer)."""
    proj = getattr(model, "text", model).text_projection
    return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]


def interpolate_pos_embed(state_dict, model):
    """Resize the visual positional-embedding grid of CLIP weights to the model's input size, e.g.
    224 -> 384 (paper Table 3, ViT-B/16-384). ViT: 'visual.positional_embedding' (1 + g*g, D); ResNet:
    'visual.attnpool.positional_embedding' (1 + g*g, D). Bicubic on the g x g grid, class token kept."""
    own = model.state_dict()
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key not in state_dict or key not in own or state_dict[key].shape == own[key].shape:
            continue
        old, new = state_dict[key], own[key]
        g_old, g_new = int(math.isqrt(old.shape[0] - 1)), int(math.isqrt(new.shape[0] - 1))
        grid = old[1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()       # (1, D, g, g)
        grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1).to(old.dtype)
        state_dict[key] = torch.cat([old[:1], grid])
    return state_dict


def load_clip_file(model, path):
    """Load local CLIP weights into model: a state dict (plain, {'state_dict': ...}, 'module.'-prefixed, or
    .safetensors), or one of OpenAI's TorchScript archives (RN50.pt, ViT-B-16.pt, as the `clip` package and the
    official VL-LTR code keep them in pretrained/)."""
    if not os.path.exists(path):
        raise DataError(f"--clip-weights {path} not found")
    try:
        if is_torchscript_archive(path):
            sd = torchscript_state_dict(path, model)
        else:
            sd = open_clip.factory.load_state_dict(path)          # weights_only=True inside
    except Exception as e:
        raise DataError(f"cannot read CLIP weights {path}: {str(e).splitlines()[0]}; pass a state dict file "
                        f"or one of OpenAI's CLIP archives (RN50.pt, ViT-B-16.pt)")
    sd = interpolate_pos_embed(dict(sd), model)
    missing, unexpected = model.load_state_dict(sd, strict=False)   # fp16 archive tensors are cast to the model's
    if missing or unexpected:
        raise DataError(f"CLIP weights {path} do not fit this backbone ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]}); check --backbone")
    return model


def is_torchscript_archive(path):
    """True for a TorchScript archive (torch.jit.save): a zip holding <name>/code/... and <name>/constants.pkl,
    which torch.save's zip files never hold. Checked before torch.jit.load sees the file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl") for n in z.namelist())


def torchscript_state_dict(path, model):
    """The tensors of a TorchScript archive, read by the TorchScript loader (no Python pickle runs). OpenAI's
    archives name CLIP's weights as open_clip does (RN50, ViT-B/16) and add three numbers that are not weights;
    an archive traced from an open_clip model also holds its non-persistent buffers (attn_mask)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # "torch.jit.load is deprecated"
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    persistent = model.state_dict()
    not_weights = {"input_resolution", "context_length", "vocab_size"}
    not_weights |= {name for name, _ in model.named_buffers() if name not in persistent}
    return {k: v for k, v in sd.items() if k not in not_weights}


def pretrained_weights(backbone, tag):
    """The path of the CLIP weights open_clip names for (backbone, tag) (the paper's: 'openai'): a local file its
    config points at, its cached copy, else a download through open_clip when its server can be reached.
    Offline, one line at once (open_clip itself retries for about 46 s before failing, docs/design.md §7)."""
    what = "OpenAI CLIP weights" if tag == OPENAI_TAG else f"CLIP weights --pretrained {tag}"
    cfg = open_clip.get_pretrained_cfg(backbone, tag)
    if not cfg:
        pretrained_cfg(backbone, tag)                             # an unknown tag: its own line, with the tags
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(backbone)) or "none"
        raise DataError(f"open_clip has no {what} for --backbone {backbone}; pass --clip-weights PATH, or "
                        f"--pretrained one of its tags ({tags})")
    if cfg.get("file"):                          # a local entry: open_clip.download_pretrained's first case
        return cfg["file"]
    path = cached_weights(cfg)
    if path:
        return path
    if tag == OPENAI_TAG:
        how = (f"pass --clip-weights PATH to a local file ({backbone}.pt from OpenAI, as the official code keeps it "
               f"in pretrained/, or a state dict), or run once with internet so open_clip caches them")
    else:
        how = (f"pass --clip-weights PATH to a local copy ({cfg.get('hf_hub') or cfg.get('url')}) with --pretrained "
               f"{tag}, or run once with internet so open_clip caches them")
    host = download_host(cfg)
    if not host:
        raise DataError(f"no {what} for {backbone} in open_clip's cache, and open_clip downloads them only through "
                        f"the Hugging Face hub: pip install huggingface_hub, or {how}")
    if not reachable(host):
        raise DataError(f"no {what} for {backbone} in open_clip's cache and {host} cannot be reached: {how}")
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:
        raise DataError(f"downloading {what} for {backbone} failed ({type(e).__name__}): {how}")


def cached_weights(cfg):
    """Where open_clip 3.3 keeps downloaded weights, if they are there: the Hugging Face hub cache
    (cfg['hf_hub'], a safetensors or .bin state dict; used when huggingface_hub is installed), or
    ~/.cache/clip/<name> (cfg['url'], e.g. OpenAI's TorchScript archive). None when neither is there."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        import huggingface_hub
        repo, filename = os.path.split(cfg["hf_hub"])
        for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            path = huggingface_hub.try_to_load_from_cache(repo, name)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def download_host(cfg):
    """The server open_clip.download_pretrained(cfg) fetches from: the Hugging Face hub when it is installed, else
    the config's URL; None when there is neither (a hub-only tag without huggingface_hub)."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        return urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urllib.parse.urlparse(cfg["url"]).hostname if cfg.get("url") else None


def reachable(host, timeout=5):
    """True when a TCP connection to host:443 opens within `timeout` s (or an HTTPS proxy is set: then the
    download's own error speaks)."""
    if urllib.request.getproxies().get("https"):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def encode_text_trimmed(model, tokens, groups=1):
    """model.encode_text on a batch's tokens cut to its longest sentence (up to the last EOT): the same
    embeddings, (N, L) tokens -> (N, D), for a fraction of the work (wiki sentences average ~29 tokens of 77).
    groups > 1: the sentences run shortest first in that many groups, each cut to its own longest, and come
    back in their order (a sentence's embedding depends on it alone). At batch 256 the longest sentence is
    nearly always 77 tokens long; in 4 groups the text tower sees ~39 positions per sentence on average.
    tokens may be on the CPU (then no host sync); they are moved to the model's device."""
    tower = getattr(model, "text", model)           # CustomTextCLIP keeps its text tower in .text; CLIP flattens it
    device = tower.positional_embedding.device
    if (getattr(tower, "text_pool_type", getattr(tower, "pool_type", None)) != "argmax" or tower.attn_mask is None
            or getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False)):
        return model.encode_text(tokens.long().to(device))   # another kind of text tower: the full forward
    if groups > 1:
        order = tokens.argmax(dim=-1).argsort()                  # (N,) by EOT position: shortest first
        out = torch.cat([encode_text_trimmed(model, tokens[rows]) for rows in order.chunk(groups)])
        return out[order.argsort().to(device)]                   # (N, D) back in the batch's order
    # Exact: under the causal mask no position sees a later one, and only the EOT (argmax) position is pooled,
    # so the positions after the longest sentence's EOT never reach the output.
    L = int(tokens.argmax(dim=-1).max()) + 1
    T = tokens[:, :L].long().to(device, non_blocking=True)                      # (N, L)
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(T).to(cast) + tower.positional_embedding[:L].to(cast)   # (N, L, W)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:L, :L]))
    x = x[torch.arange(len(T), device=device), T.argmax(dim=-1)]                 # (N, W) at each EOT
    proj = tower.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj           # (N, D)


# ----------------------------------------------------------------------------------------------
# The text tower in one pass: a batch's sentences packed end to end (the training step's; encode_text_trimmed's
# length groups are the readable form it replaces, open_clip's full-context encode_text the reference of both)


class PackedText(NamedTuple):
    """N sentences packed for one pass of the text tower (pack_sentences): P rows, the sum of their lengths (SOT to
    EOT), instead of N x L positions. At batch 256 with ImageNet-LT's ~29-token sentences: 29 rows a sentence,
    against 77 in open_clip's forward and about 39 in encode_text_trimmed's 4 length groups.

    tokens (P,) int64: every sentence's tokens up to its EOT, one sentence after another
    positions (P,) int64: each token's position in its sentence, which picks its positional embedding
    rows (P,) int64: each token's row in the padded (N * width) layout, n * width + position (padded_causal_attention)
    eot (N,) int64: each sentence's EOT row in the packing, the row open_clip pools (the tokens' argmax)
    cu_seqlens (N + 1,) int32: sentence n owns rows cu_seqlens[n]:cu_seqlens[n + 1] (varlen_causal_attention)
    width: the longest sentence rounded up to a multiple of 8 (a handful of shapes for a compiled step), at most L
    varlen: flash's variable-length attention can run on these tensors (CUDA, compute capability 8.0 or more)
    """
    tokens: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    eot: torch.Tensor
    cu_seqlens: torch.Tensor
    width: int
    varlen: bool


def varlen_causal_attention_fn():
    """torch's flash variable-length attention (torch.nn.attention.varlen.varlen_attn), asked for a causal mask as
    this torch version asks (window_size=(-1, 0); its first versions: is_causal=True); None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return functools.partial(varlen_attn, window_size=(-1, 0))
    return functools.partial(varlen_attn, is_causal=True) if "is_causal" in params else None


VARLEN_CAUSAL = varlen_causal_attention_fn()


def varlen_available(device):
    """True where varlen_causal_attention can run: a CUDA device of compute capability 8.0 or more (flash)."""
    return (VARLEN_CAUSAL is not None and str(device).startswith("cuda")
            and torch.cuda.get_device_capability(torch.device(device))[0] >= 8)


def pack_sentences(tokens, device="cpu"):
    """(N, L) tokens on the host -> PackedText on `device`. Worked out on the host (numpy) from each sentence's EOT
    position, its argmax as open_clip pools it, and moved in one copy from pinned memory (engine.host_to_device):
    nothing here waits for the device."""
    T = tokens.cpu().numpy()
    N, L = T.shape
    lengths = T.argmax(axis=1) + 1                                       # (N,) SOT .. EOT
    cu = np.concatenate([[0], np.cumsum(lengths)])                       # (N + 1,)
    sentence = np.repeat(np.arange(N), lengths)                          # (P,) the sentence of each packed row
    positions = np.arange(cu[-1]) - cu[sentence]                         # (P,)
    width = min(L, -(-int(lengths.max()) // 8) * 8)
    P = len(positions)
    host = torch.from_numpy(np.concatenate([T[sentence, positions], positions, sentence * width + positions,
                                            cu[1:] - 1, cu]).astype(np.int64))
    tokens, positions, rows, eot, cu_seqlens = host_to_device(host, device).split([P, P, P, N, N + 1])
    return PackedText(tokens, positions, rows, eot, cu_seqlens.to(torch.int32), width, varlen_available(device))


def packable(model):
    """True when the text tower is open_clip's causal transformer with EOT (argmax) pooling and plain blocks
    (open_clip's ResidualAttentionBlock around nn.MultiheadAttention without dropout), which encode_text_packed
    runs; another kind of tower runs in length groups (encode_text_trimmed), or whole."""
    tower = getattr(model, "text", model)
    if (getattr(tower, "text_pool_type", getattr(tower, "pool_type", None)) != "argmax"
            or getattr(tower, "attn_mask", None) is None or getattr(tower, "cls_emb", None) is not None
            or getattr(tower, "use_pad_mask", False) or tower.transformer.grad_checkpointing):
        return False
    plain = lambda a: (type(a) is torch.nn.MultiheadAttention and a._qkv_same_embed_dim and a.in_proj_bias is not None
                       and a.bias_k is None and not a.add_zero_attn and a.dropout == 0)
    return all(type(b) is ResidualAttentionBlock and plain(b.attn) for b in tower.transformer.resblocks)


def encode_text_packed(model, packed):
    """model.encode_text of the packed sentences in one pass: PackedText -> (N, D), the same embeddings as the full
    77-token forward (tests/test_fast_path.py: values and gradients, fp32). Exact for the reason trimming is: under
    the causal mask no token sees a later one, so a sentence's rows never need the padding after its EOT, and
    each sentence attends to its own rows only (packed_causal_attention). Every other layer works row by row."""
    tower = getattr(model, "text", model)
    cast = tower.transformer.get_cast_dtype()
    # Both tables are read with F.embedding: its backward sums the rows of a repeated index in a fixed order, where
    # indexing's (index_put_ with accumulate) adds them atomically across threads, in whatever order they arrive.
    pos = F.embedding(packed.positions, tower.positional_embedding)              # (P, W)
    x = tower.token_embedding(packed.tokens).to(cast) + pos.to(cast)            # (P, W)
    for block in tower.transformer.resblocks:                  # open_clip's ResidualAttentionBlock.forward, on rows
        x = x + block.ls_1(packed_causal_attention(block.attn, block.ln_1(x), packed))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = tower.ln_final(x.index_select(0, packed.eot))          # (N, W): LayerNorm is per row, so pooling first is exact
    proj = tower.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj if proj is not None else x   # (N, D)


def packed_causal_attention(attn, x, packed):
    """nn.MultiheadAttention's causal self-attention as open_clip's text blocks call it, on packed rows: x (P, W) ->
    (P, W), each sentence attending to its own earlier rows. The projections are attn's own; the attention is flash's
    variable-length kernel on the rows themselves where it runs (bf16 / fp16 on CUDA), else the padded form."""
    P, W = x.shape
    H = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(P, 3, H, W // H)   # (P, 3, H, d)
    if packed.varlen and qkv.dtype in (torch.float16, torch.bfloat16):
        out = varlen_causal_attention(qkv, packed)
    else:
        out = padded_causal_attention(qkv, packed)
    return attn.out_proj(out.reshape(P, W))                    # (P, W)


def varlen_causal_attention(qkv, packed):
    """Causal attention of each packed sentence over its own rows, by flash's variable-length kernel (CUDA only):
    qkv (P, 3, H, d) -> (P, H, d). width bounds every sentence's length, as the kernel's max_seqlen asks."""
    q, k, v = qkv.unbind(1)                                    # 3 x (P, H, d)
    return VARLEN_CAUSAL(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.width, packed.width)


def padded_causal_attention(qkv, packed):
    """Causal attention of each packed sentence over its own rows, on any device: qkv (P, 3, H, d) -> (P, H, d).
    The rows go to a zero-padded (N, width) grid, one sentence a row starting at position 0, run through scaled
    dot-product attention with is_causal (a flash kernel on a GPU), and come back. Exact: a sentence's positions see
    only its own earlier ones, never the padding after it; the padding's own outputs are never read."""
    P, _, H, d = qkv.shape
    N, width = packed.eot.shape[0], packed.width
    grid = qkv.new_zeros(N * width, 3, H, d).index_copy(0, packed.rows, qkv)          # (N width, 3, H, d)
    q, k, v = grid.view(N, width, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)          # 3 x (N, H, width, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)                    # (N, H, width, d)
    return out.transpose(1, 2).reshape(N * width, H, d).index_select(0, packed.rows)  # (P, H, d)


def encode_sentences(model, T):
    """The text tower on a training batch's sentences: T a PackedText (one pass, encode_text_packed) or (N, L) tokens
    (4 length groups, encode_text_trimmed, the readable form) -> (N, D)."""
    return encode_text_packed(model, T) if isinstance(T, PackedText) else encode_text_trimmed(model, T, groups=4)


# ----------------------------------------------------------------------------------------------
# What a GPU wants of the step's models: the same maths, other layouts and casts


def channels_last(model):
    """RN50's image tower (open_clip's ModifiedResNet) in channels_last, the layout of cuDNN's fastest convolutions
    (its NHWC kernels transpose an NCHW tensor before and after each). The same maths: only the memory order of
    the weights and, from the first convolution on, of the activations changes. True when applied; a ViT's
    one convolution (the patch embedding) is left as it is."""
    if type(getattr(model, "visual", None)).__name__ != "ModifiedResNet":
        return False
    model.visual.to(memory_format=torch.channels_last)
    return True


def cast_frozen_weights(model, forward, precision):
    """Cast, once, the frozen weights that autocast casts in every call. autocast keeps its cast of a weight for the
    rest of the region only when the weight requires a gradient, so a frozen model's weights (CVLP's teacher) are
    cast again in every forward. forward() runs the model on a probe batch inside the `precision` context
    (engine.autocast); every frozen weight that autocast cast there to a lower precision, and that no operation
    read uncast, is stored in that precision. The same operations then get the same rounded copy; the probe is run
    again and, unless its outputs are bitwise the same, the weights go back (a module that chooses its kernel by its
    weights' dtype, as nn.MultiheadAttention's fast path does under a CPU autocast, would compute otherwise).
    Returns {name: dtype} of the weights cast (none where autocast is off)."""
    frozen = {(p.data_ptr(), p.shape, p.stride(), p.dtype): name for name, p in model.named_parameters()
              if p.is_floating_point() and not p.requires_grad}
    cast, raw = {}, set()

    class Probe(TorchDispatchMode):                            # sees the operations autocast lets through, its casts too
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for a in pytree.tree_leaves((args, kwargs)):
                name = frozen.get((a.data_ptr(), a.shape, a.stride(), a.dtype)) if isinstance(a, torch.Tensor) else None
                if name is None:
                    continue
                if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") in (torch.bfloat16, torch.float16):
                    cast[name] = kwargs["dtype"]
                else:
                    raw.add(name)
            return func(*args, **kwargs)

    with torch.no_grad(), precision:
        with Probe():
            before = forward()
        params, kept = dict(model.named_parameters()), {}
        for name in set(cast) - raw:
            kept[name], params[name].data = params[name].data, params[name].data.to(cast[name])
        after = forward() if kept else before
    if not all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(before), pytree.tree_leaves(after))):
        for name, data in kept.items():
            params[name].data = data
        return {}
    return {name: cast[name] for name in sorted(kept)}


def tokenize_corpus(corpus, context_length=77, cache_dir=None):
    """A corpus's sentences (corpus.sentences: [C][k] strings), flattened class by class, tokenised once with the
    open_clip BPE tokenizer (tokenize_exact).

    Returns {"tokens": (S, L) int32, "label": (S,) int64 class of each sentence,
             "offsets": (C + 1,) int64, class c owns sentences offsets[c]:offsets[c+1],
             "truncated": number of sentences longer than the context (cut, EOT kept last)}.
    Cached under cache_dir, keyed by a hash of the sentences and the context length. One warning when
    some sentences were truncated (also on a cache hit: the count is in the cache).
    """
    flat = [s for sents in corpus.sentences for s in sents]
    key = hashlib.sha1(("\n".join(flat) + f"|{context_length}|v2").encode()).hexdigest()[:16]   # v2: exact count
    path = os.path.join(cache_dir, f"tokens_{key}.pt") if cache_dir else None
    out = None
    if path and os.path.exists(path):
        try:
            out = torch.load(path, weights_only=True)
        except Exception:
            pass
    if out is None:
        tokens, truncated = tokenize_exact(flat, context_length)
        sizes = [len(s) for s in corpus.sentences]
        out = {"tokens": tokens.to(torch.int32),
               "label": torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)),
               "offsets": torch.tensor([0] + list(np.cumsum(sizes)), dtype=torch.long),
               "truncated": truncated}
        if path:
            try:
                atomic_write(path, lambda f: torch.save(out, f))
            except OSError:
                pass
    if out["truncated"]:
        warn(f"{out['truncated']} sentences are longer than the {context_length}-token context and were "
             "truncated (EOT kept last)")
    return out


def cache_dir():
    """Where tokenised corpora are kept between runs: $VL_LTR_CACHE, else ~/.cache/vl-ltr. One file per corpus
    and context length (named by their hash), shared by every run folder: a corpus is tokenised once (iNat's
    919K sentences take about a minute)."""
    return os.environ.get("VL_LTR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vl-ltr")


@torch.no_grad()
def encode_texts(model, tokens, device, batch=1024, desc="text", training_precision=False, normalize=True):
    """(S, L) tokens -> (S, D) text embeddings, L2-normalised (normalize=False: as the encoder gives them, the values V
    of the LGR head), in chunks (eval mode, no grad), in the evaluation
    precision (fp32, engine.eval_precision). training_precision: in the training autocast instead, for CVLP's
    cached teacher text, which stands in for the teacher's forward inside the training step. Sentences go
    shortest first, so that each chunk is trimmed to about its own length (encode_text_trimmed)."""
    model.eval()
    order = tokens.argmax(dim=-1).argsort()                      # (S,) by EOT position: shortest first
    out = torch.empty(len(tokens), embed_dim(model), device=device)   # (S, D), filled in place: one copy, not three
    for i in progress(range(0, len(tokens), batch), desc=desc, unit="batch"):
        rows = order[i:i + batch]                                # written back in corpus order
        with autocast(device) if training_precision else eval_precision(device):
            E = encode_text_trimmed(model, tokens[rows]).float()
            out[rows.to(device)] = F.normalize(E, dim=-1) if normalize else E
    return out


@torch.no_grad()
def encode_images(encode_fn, loader, device, desc="images"):
    """All images of a loader -> ((N, D) L2-normalised embeddings, (N,) labels), in fp32 (engine.eval_precision)."""
    feats, labels = [], []
    for x, y in progress(loader, desc=desc, unit="batch"):
        with eval_precision(device):
            feats.append(F.normalize(encode_fn(x.to(device, non_blocking=True)).float(), dim=-1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(device)


@functools.lru_cache(maxsize=None)
def bpe_tokenizer():
    """open_clip's BPE tokenizer (CLIP's, the same for every OpenAI model), built once per process: building
    it reads the vocabulary, ~0.1 s, which a loop over 8,142 classes would pay 8,142 times."""
    return open_clip.get_tokenizer("RN50")


def tokenize_exact(sentences, context_length):
    """[S] str -> ((S, L) int64 tokens cut like open_clip cuts them (EOT kept last), number of sentences
    longer than L). Tokenising to L + 1 and cutting gives the same tokens, and a token in slot L + 1 tells
    exactly which sentences did not fit (an EOT in slot L may also be a sentence that just fits)."""
    tokenizer = bpe_tokenizer()
    chunks = range(0, len(sentences), 4096)
    tokens = [tokenizer(sentences[i:i + 4096], context_length=context_length + 1)
              for i in (progress(chunks, desc="tokenising", unit="chunk") if len(chunks) > 8 else chunks)]
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, context_length + 1, dtype=torch.long)
    cut = tokens[:, -1] != 0                                     # (S,) longer than the context
    tokens = tokens[:, :context_length].clone()                  # (S, L)
    tokens[cut, -1] = tokenizer.eot_token_id
    return tokens, int(cut.sum())
