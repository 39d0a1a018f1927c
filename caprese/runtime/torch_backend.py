"""PyTorch backend: the reference decoder (caprese.model) of what an engine folder was exported from.

The manifest records the export's source: a Hugging Face folder, or a calibration artifact and its base model,
with the base model's fingerprint. The decoder is loaded from there at the engine's precision, the artifact's
method and adapters applied, and driven through the same prefill / select / decode calls as the graphs:
prefill runs the dense FFNs (phase "prefill"), decode the approximated ones; the selection statistics of each
prefill call are read back from the FFNs and the combined selection written into them (sorted top-k, as
caprese.export.folding picks it), so the torch and graph backends see identical selections.
`source=` overrides the recorded folder (an artifact's base model keeps its recorded path unless
`base_model=` is given).

Decode on CUDA (default) runs `Decoder.decode_static` — the slot in a tensor, attention over the whole cache
through a mask — captured once per KV allocation as a CUDA graph and replayed every step (GRIFFIN's compact
slices and CATS' τ live in fixed buffers refilled in place by select()). `static=True` runs that same step
eagerly (on CPU too: how the tests check it), `cuda_graph=False` turns capture off.
"""

from __future__ import annotations

from pathlib import Path

import torch

from caprese import cpu_threads
from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.folding import select_neurons
from caprese.export.engine_spec import method_kind
from caprese.model.loading import check_device
from caprese.runtime.backend import Backend, PrefillOut
from caprese.runtime.buffers import new_capacity, read_stats
from caprese.runtime.cuda_graph import CapturedStep


def load_reference(manifest, device: str, source: str | None = None, base_model: str | None = None):
    """The decoder an engine folder was exported from, with its method applied; CapreseError if it is gone."""
    from caprese.calibration.artifact import fingerprint, is_artifact, load_artifact
    from caprese.model.loading import load_decoder

    rec = manifest.data.get("source") or {}
    path = Path(source or rec.get("path") or "")
    if not rec.get("path") and source is None:
        raise CapreseError(f"{manifest.folder}/manifest.json records no source model; the torch backend needs one "
                           "(pass source=...)")
    if not path.is_dir():
        raise CapreseError(f"the torch backend loads the model the engine was exported from, and {path} is missing; "
                           "use --backend onnxruntime, or restore that folder")
    precision = manifest.spec.precision
    if is_artifact(path):
        art = load_artifact(path, base_model or rec.get("base_model"))
        if rec.get("fingerprint") and art.fingerprint != rec["fingerprint"]:
            raise CapreseError(f"the artifact {path} belongs to another base model than the engine's; export again")
        recipe = manifest.spec.recipe
        if method_kind(art.method) != recipe.method or art.density != recipe.density or art.rank != recipe.rank:
            raise CapreseError(f"the artifact {path} ({art.method}, density {art.density}, rank {art.rank}) no longer "
                               f"matches the engine ({recipe.method}, density {recipe.density}); export again")
        decoder = load_decoder(art.base_model, precision, device)
        _quantized(decoder, manifest)
        art.apply(decoder)
    else:
        if rec.get("fingerprint") and fingerprint(path) != rec["fingerprint"]:
            raise CapreseError(f"the model folder {path} changed since the engine was exported (fingerprint differs); "
                               "export again")
        decoder = load_decoder(path, precision, device)
        _quantized(decoder, manifest)
    decoder.requires_grad_(False)
    return decoder


def _quantized(decoder, manifest) -> None:
    """A quantized engine's reference holds its weights.bin codes, dequantized (the graphs' exact values)."""
    if manifest.layout.quantized:
        from caprese.export.quantized_weights import load_engine_weights

        load_engine_weights(decoder, manifest)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest, threads: int | None = None, device: str | None = None, source: str | None = None,
                 base_model: str | None = None, static: bool | None = None, cuda_graph: bool | None = None):
        from caprese.calibration.methods import efficient_layers

        super().__init__(manifest)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads or device == "cpu":  # on the CPU: one thread per free CPU unless told (caprese.cpu_threads)
            torch.set_num_threads(cpu_threads.resolve(threads))
        check_device(device)
        self.device = self.logits_device = device
        self.threads = threads
        self.decoder = load_reference(manifest, device, source, base_model)
        self.ffns = efficient_layers(self.decoder)
        lay = self.layout
        kinds = {i: method_kind(f.method) for i, f in self.ffns.items()}
        want = {i: k for i, k in enumerate(lay.layer_kinds) if k != C.DENSE}
        if kinds != want or any(self.ffns[i].k != lay.k for i in lay.layers_of(C.GRIFFIN)):
            raise CapreseError(f"the source model's methods {kinds} do not match the engine's layers {want}; export "
                               "again")
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._slot = torch.zeros((1,), dtype=torch.long, device=device)
        on_gpu = device.startswith("cuda")
        self.cuda_graph = on_gpu if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and not on_gpu:
            raise CapreseError("CUDA graphs need a CUDA device; drop cuda_graph=True or use device='cuda'")
        self.static = self.cuda_graph or (on_gpu if static is None else bool(static))
        self._tau: dict[int, torch.Tensor] = {}  # CATS τ in fixed buffers (static decode)
        self._graph = self._graph_key = None

    def reserve(self, need: int, keep: int = 0) -> None:
        cap = new_capacity(self.capacity, need, keep, self.manifest.spec.max_seq_len, "fit")
        if cap is None:
            return
        old = [(layer.self_attn.cache.k, layer.self_attn.cache.v) for layer in self.decoder.layers] if keep else []
        self.decoder.setup_caches(1, cap)
        for (k, v), layer in zip(old, self.decoder.layers):
            n = min(keep, cap, k.shape[2])
            layer.self_attn.cache.k[:, :, :n] = k[:, :, :n]
            layer.self_attn.cache.v[:, :, :n] = v[:, :, :n]
        self.capacity = cap

    @torch.inference_mode()
    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        for f in self.ffns.values():  # this call's statistics only: the Generator combines the calls
            if f.method == C.GRIFFIN:
                f.stat_sq = None
            elif f.method == C.CATS:
                f.tau = None
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.decoder(tokens, start, None, last_only=True, phase="prefill")[:, -1].float()
        stat = {C.griffin_stat(i): f.stat_sq for i, f in self.ffns.items() if f.method == C.GRIFFIN}
        stat.update({C.cats_tau(i): f.tau for i, f in self.ffns.items() if f.method == C.CATS})
        return PrefillOut(logits, *read_stats(self.layout, stat.__getitem__))

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        for i, stat in griffin.items():
            f = self.ffns[i]
            f.stat_sq = stat.to(self.device)
            f.set_selection(select_neurons(stat, self.layout.k).to(self.device))
            if self.static:
                f.pin_weights()
        for i, t in tau.items():
            if not self.static:
                self.ffns[i].tau = t.to(self.device)
                continue
            buf = self._tau.get(i)
            if buf is None or buf.shape != t.shape:
                buf = self._tau[i] = t.to(self.device).clone()
                self._graph = None  # a new address: capture again
            buf.copy_(t)
            self.ffns[i].tau = buf

    @torch.inference_mode()
    def decode(self, token: int, slot: int) -> torch.Tensor:
        self._token.fill_(token)
        if not self.static:
            return self.decoder(self._token, slot, None, phase="decode")[:, -1].float()
        self._slot.fill_(slot)
        if not self.cuda_graph:
            return self.decoder.decode_static(self._token, self._slot)[:, -1].float()
        key = tuple(t.data_ptr() for layer in self.decoder.layers for t in (layer.self_attn.cache.k,
                                                                           layer.self_attn.cache.v))
        if self._graph is None or self._graph_key != key:  # first step, or a new KV allocation: capture again
            self._graph = CapturedStep(self.decoder.decode_static, self._token, self._slot)
            self._graph_key = key
        return self._graph.replay()[:, -1].float()

    def attended(self, slot: int) -> int:
        # the eager step attends to the valid prefix only; the static one reads the whole allocation
        return self.capacity if self.static else slot + 1

    def peak_device_mb(self) -> float | None:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        return None

    def describe(self) -> dict:
        return {"torch_threads": torch.get_num_threads(), "static_decode": self.static, "cuda_graph": self.cuda_graph,
                "source": str((self.manifest.data.get("source") or {})
                                                                      .get("path"))}
