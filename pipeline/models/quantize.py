"""int8 on CPU for the encoder tasks: `model.dtype = "int8"` (bench/RESULTS.md, "int8 on CPU").

The scheme, chosen by measurement on all-MiniLM-L6-v2 (bench/int8.py):

- every token-level `nn.Linear` of the encoder runs fbgemm's dynamic int8 matmul: weights int8
  per output channel, activations quantized per call over the whole tensor with the full 8 bits
  (PyTorch's `quantize_dynamic` keeps 7: its `reduce_range` is half the lost quality);
- SmoothQuant (Xiao et al. 2023): the linears that read the residual stream (those sharing one
  input, Q/K/V, and the expanding FFN projection) get a per-input-channel scale s (alpha 0.7, from
  a calibration pass): x/s is quantized, W*s too, so the residual stream's outlier channels no
  longer set the activation scale. In a post-LN encoder (BERT) that LayerNorm's output is also
  the residual, so the division is an explicit multiply, done once per input: linears sharing an
  input are one int8 matmul over their concatenated weights;
- the first contracting linear (the first block's FFN down projection) stays float32: the error
  it makes runs through every later layer (measured: the largest single gain in the minimum
  cosine), for 1/(3 x layers) of the linear FLOPs; heads (pooler, classifier, QA span head) stay
  float32 too: they see one row, not one token, or have a handful of outputs;
- the weights take 7 bits where fbgemm's kernel saturates at 8 (CPUs without VNNI add the
  products of two u8 x s8 pairs in 16 bits): `weight_bits` probes the kernel once.

The calibration is a fixed set of English texts (`CALIBRATION_TEXTS`), so every worker builds the
same int8 model from the same folder. `quantize_int8(model, calibration_inputs)` is the whole step.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import ModelError
from .int8_check import SCHEME


@dataclass(frozen=True)
class Scheme:
    """How an encoder is quantized; `CHOSEN` is what `model.dtype = "int8"` runs. The others are
    the research variants bench/int8.py measures."""

    smooth: str = "inputs"
    """none; inputs: linears sharing an input and expanding ones (the residual stream's readers);
    all: every quantized linear."""
    alpha: float = 0.7
    """SmoothQuant's migration strength: s = max|x|^alpha / max|w|^(1 - alpha)."""
    fuse: bool = True
    """Linears sharing an input run as one int8 matmul (the input quantized once)."""
    first_down_fp32: bool = True
    """The first contracting linear (in > out) stays float32."""
    fp32: tuple[str, ...] = ()
    """Name suffixes of linears kept float32 besides (research)."""
    weight_bits: int | None = None
    """8 or 7; None: 8 where the kernel does not saturate (`weight_bits`), else 7."""
    reduce_range: bool = False
    """7-bit activations, as torch's quantize_dynamic (research)."""


CHOSEN = Scheme()


# -- the kernel ------------------------------------------------------------------------------------


@contextmanager
def _fbgemm():
    """fbgemm packs the weights (the x86 engine's kernel for dynamic linears); torch's quantized
    tensors are deprecated and say so, which is not the user's business."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ModelError(
            "model.dtype int8 needs an x86 CPU (fbgemm's int8 kernels); this torch build has "
            f"{', '.join(torch.backends.quantized.supported_engines)}: use --dtype float32"
        )
    before = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm"
        try:
            yield
        finally:
            torch.backends.quantized.engine = before


def _pack(weight: torch.Tensor, bias: torch.Tensor | None, bits: int):
    """fbgemm's packed int8 weight, symmetric per output channel, in [-(2^(bits-1)-1), ...]."""
    w = weight.detach().float().contiguous()
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with _fbgemm():
        wq = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float().contiguous()
        return torch.ops.quantized.linear_prepack(wq, b)


@lru_cache(maxsize=1)
def weight_bits() -> int:
    """8 where fbgemm's int8 kernel is exact at 8-bit weights, else 7.

    Without VNNI, fbgemm adds the products of two u8 x s8 pairs in 16 bits, which saturate at
    full-range activations (255 x 127 x 2 > 32767); 7-bit weights (255 x 63 x 2) never do. Probed
    on this CPU (and under FBGEMM_ENABLE_INSTRUCTIONS, which picks the kernel)."""
    x = torch.ones(4, 64)  # quantized to 255: the largest activation
    packed = _pack(torch.ones(8, 64), None, 8)  # 127: the largest weight
    with _fbgemm(), torch.inference_mode():
        y = torch.ops.quantized.linear_dynamic(x, packed, False)
    return 8 if torch.allclose(y, torch.full_like(y, 64.0), rtol=1e-3) else 7


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized per call (fbgemm's dynamic
    linear); with `smooth` (SmoothQuant), (x / s) (W s)^T."""

    def __init__(self, weight, bias, smooth=None, bits: int = 8, reduce_range: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        if smooth is not None:
            w = w * smooth
            self.register_buffer("inv_smooth", (1.0 / smooth).float().contiguous())
        else:
            self.inv_smooth = None
        self.bits, self.reduce_range = bits, reduce_range
        self.members = 1  # the linears it stands for (SharedInput: several)
        self._packed = _pack(w, bias, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.inv_smooth is not None else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{smooth}"


class SharedInput(nn.Module):
    """Linears that read one input (Q, K, V) as one int8 matmul over their stacked weights: the
    input is smoothed and quantized once. Each member's module is a `Part` of it."""

    def __init__(self, linears: list[nn.Linear], smooth, bits: int, reduce_range: bool):
        super().__init__()
        weight = torch.cat([m.weight.detach().float() for m in linears])
        if any(m.bias is not None for m in linears):
            bias = torch.cat(
                [
                    m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                    for m in linears
                ]
            )
        else:
            bias = None
        self.linear = Int8Linear(weight, bias, smooth, bits, reduce_range)
        self.members = self.linear.members = len(linears)
        self._x = self._y = None
        self._left = 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:  # a new input (an identity test: the model passes one tensor)
            self._x, self._y, self._left = x, self.linear(x), self.members
        y = self._y
        self._left -= 1
        if self._left <= 0:  # every member has its part: hold nothing past this batch
            self._x = self._y = None
        return y


class Part(nn.Module):
    """One member of a `SharedInput`: its columns of the shared matmul's output. (The group is a
    submodule of the members' parent, `int8_shared_input`.)"""

    def __init__(self, group: SharedInput, start: int, stop: int):
        super().__init__()
        self.group = [group]  # a list: not a submodule of each member
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group[0].project(x)[..., self.start : self.stop]


# -- calibration -------------------------------------------------------------------------------

# English sentences of many kinds; `calibration_texts` draws texts of 1-40 words and 1-6 sentences
# from them with a fixed seed, so every worker calibrates alike.
CALIBRATION_TEXTS = (
    "The package arrived two days late, but the blender works perfectly.",
    "I would not recommend this hotel to anyone travelling with children.",
    "Quarterly revenue rose 12 percent, driven by strong demand in Asia.",
    "The committee will meet on Thursday to discuss the new budget proposal.",
    "How do I reset my password if I no longer have access to my email?",
    "Preheat the oven to 180 degrees and grease a round cake tin.",
    "The patient was admitted with chest pain and shortness of breath.",
    "Scientists observed a new species of frog in the rainforest of Peru.",
    "Click the settings icon, then choose Privacy and turn off location sharing.",
    "This function returns None when the input list is empty.",
    "The striker scored twice in the second half to win the match.",
    "Honestly, the sound quality is great for the price.",
    "Terrible customer service; they hung up on me twice.",
    "The train to Berlin departs from platform 4 at 9:15.",
    "Under the agreement, either party may terminate with thirty days notice.",
    "She studied the ancient manuscripts for years before publishing her theory.",
    "Battery life is about six hours with the screen at full brightness.",
    "Is there a vegetarian option on the lunch menu today?",
    "The river flooded the lower part of the town after three days of rain.",
    "Our team is hiring a senior data engineer in London.",
    "Five stars. Fast shipping and exactly as described.",
    "The film is far too long, and the ending makes no sense.",
    "Interest rates are expected to remain unchanged until next spring.",
    "Wear comfortable shoes; the walking tour lasts about three hours.",
    "The update fixed the crash but the app still drains the battery.",
    "Mix the flour, sugar and butter until the dough comes together.",
    "He signed a two-year contract with an option for a third season.",
    "Please find attached the invoice for the services rendered in March.",
    "The museum is closed on Mondays and public holidays.",
    "My order number is 58213 and it still shows as processing.",
    "Solar panels now supply a quarter of the country's electricity.",
    "The chair is comfortable, though assembly took over an hour.",
    "What is the difference between a virus and a bacterium?",
    "The defendant pleaded not guilty to all charges.",
    "We stayed three nights; the room was clean and the staff were friendly.",
    "Update the dependencies and run the tests again before merging.",
    "Cheap material, the seams split after one wash.",
    "The conference brings together researchers from over forty countries.",
    "Turn left at the second roundabout and the school is on your right.",
    "I love how light these headphones are, I forget I am wearing them.",
)


def calibration_texts(n: int = 256, seed: int = 0) -> list[str]:
    """`n` texts drawn from CALIBRATION_TEXTS: short fragments, sentences and paragraphs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 8 == 0:  # a few words: short rows are common in real corpora
            words = rng.choice(CALIBRATION_TEXTS).split()
            start = rng.randrange(len(words))
            out.append(" ".join(words[start : start + rng.randint(1, 4)]))
        else:
            out.append(" ".join(rng.sample(CALIBRATION_TEXTS, rng.randint(1, 6))))
    return out


def calibration_inputs(tokenizer, max_length: int = 256, n: int = 256, tokens: int = 2048):
    """Padded batches (dicts of tensors, as the tasks pass them) of `calibration_texts`."""
    texts = sorted(calibration_texts(n), key=len)
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
    pad = tokenizer.pad_token_id or 0
    batches, start = [], 0
    while start < len(texts):
        stop = start + 1
        while stop < len(texts) and len(enc["input_ids"][stop]) * (stop + 1 - start) <= tokens:
            stop += 1
        longest = max(len(enc["input_ids"][i]) for i in range(start, stop))
        batch = {}
        for k in keys:
            fill = pad if k == "input_ids" else 0
            rows = [enc[k][i] + [fill] * (longest - len(enc[k][i])) for i in range(start, stop)]
            batch[k] = torch.tensor(rows, dtype=torch.long)
        batches.append(batch)
        start = stop
    return batches


@dataclass
class _Seen:
    """What calibration saw of one linear."""

    name: str
    module: nn.Linear
    order: int
    token_level: bool = False
    absmax: torch.Tensor | None = None
    shares: int | None = None
    """Linears with the same value read the same input tensor (Q, K, V)."""


def _observe(model: nn.Module, inputs, call) -> list[_Seen]:
    """Run `inputs` through the model, noting per linear: the order of its first call, whether
    its input is per token (3-D), the per-channel max |x|; and, from two rows of the first batch,
    which linears read one input tensor."""
    seen: dict[nn.Module, _Seen] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    readers: dict[int, list[nn.Module]] = {}
    held: list[torch.Tensor] = []  # alive through the probe, so no two inputs share an id()

    def probe(module, args, _out):
        held.append(args[0])
        readers.setdefault(id(args[0]), []).append(module)

    def observe(module, args, _out):
        x = args[0].detach()
        s = seen.get(module)
        if s is None:
            s = seen[module] = _Seen(names[module], module, len(seen))
        s.token_level = x.dim() >= 3
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        s.absmax = a if s.absmax is None else torch.maximum(s.absmax, a)

    with torch.inference_mode():
        handles = [m.register_forward_hook(probe) for m in names]
        try:
            call({k: v[:2] for k, v in inputs[0].items()})
        finally:
            for h in handles:
                h.remove()
        held.clear()
        handles = [m.register_forward_hook(observe) for m in names]
        try:
            for batch in inputs:
                call(batch)
        finally:
            for h in handles:
                h.remove()
    shares = {m: i for i, ms in enumerate(readers.values()) if len(ms) > 1 for m in ms}
    out = sorted(seen.values(), key=lambda s: s.order)
    for s in out:
        s.shares = shares.get(s.module)
    return out


def _smoothing(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = absmax.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5, max=1e5)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_int8(
    model: nn.Module, calibration_inputs=None, scheme: Scheme = CHOSEN, call=None
) -> nn.Module:
    """`model` (float32, on CPU) with its encoder's linears in int8, in place; returns it.

    `calibration_inputs`: batches (dicts of tensors) run through `call(batch)` (default
    `model(**batch)`) to find the token-level linears, the ones sharing an input and the
    activations' ranges. Without them: every linear with 32+ inputs and outputs, per channel,
    no smoothing."""
    if next(model.parameters()).device.type != "cpu":
        raise ModelError("model.dtype int8 runs on CPU only; on a GPU use --dtype bfloat16")
    bits = scheme.weight_bits or weight_bits()
    model = model.float().eval()
    if calibration_inputs is None:
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= 32:
                _set(model, name, Int8Linear(m.weight, m.bias, None, bits, scheme.reduce_range))
        return model
    seen = _observe(model, calibration_inputs, call or (lambda b: model(**b)))
    todo = [
        s
        for s in seen
        if s.token_level
        and min(s.module.in_features, s.module.out_features) >= 32
        and not s.name.endswith(scheme.fp32)
    ]
    if scheme.first_down_fp32:
        down = next((s for s in todo if s.module.in_features > s.module.out_features), None)
        todo = [s for s in todo if s is not down]
    groups: dict[int, list[_Seen]] = {}
    for s in todo:
        key = s.shares if (scheme.fuse and s.shares is not None) else -1 - s.order
        groups.setdefault(key, []).append(s)
    for members in groups.values():
        first = members[0]
        reads_stream = (
            first.shares is not None or first.module.out_features > first.module.in_features
        )
        wants = scheme.smooth == "all" or (scheme.smooth == "inputs" and reads_stream)
        smooth = None
        if wants:
            absmax = torch.stack([s.absmax for s in members]).amax(dim=0)
            smooth = _smoothing(absmax, [s.module.weight for s in members], scheme.alpha)
        if len(members) == 1:
            m = members[0].module
            _set(model, members[0].name, Int8Linear(m.weight, m.bias, smooth, bits,
                                                     scheme.reduce_range))  # fmt: skip
            continue
        group = SharedInput([s.module for s in members], smooth, bits, scheme.reduce_range)
        parent = members[0].name.rpartition(".")[0]
        (model.get_submodule(parent) if parent else model).add_module("int8_shared_input", group)
        start = 0
        for s in members:
            _set(model, s.name, Part(group, start, start + s.module.out_features))
            start += s.module.out_features
    return model


def describe(model: nn.Module) -> dict:
    """What quantize_int8 made of `model`: linears in int8 (and of them smoothed), linears kept
    float32, the weights' bits."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    return {
        "scheme": SCHEME,
        "int8_linears": sum(m.members for m in int8),
        "smoothed": sum(m.members for m in int8 if m.inv_smooth is not None),
        "float32_linears": sum(isinstance(m, nn.Linear) for m in model.modules()),
        "weight_bits": max((m.bits for m in int8), default=None),
    }
