"""The stages of a training run, replayed on the ``meta`` device under the storage tracker.

Each stage holds what the trainer keeps on the card at that moment and runs the training code itself:
the autoencoder stage of a latent job, the cache encoding, a steady-state step (the trainer's optimizer or
``FusedBackward``, the EMA), validation and the sample previews. ``profiler.profile_step`` runs them in the
order a run does and takes the peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .autocast import MetaAutocast
from .tracker import StorageTracker
from .workloads import Built, Knobs, Preview, Workload

STEP_RANGE = "lowvram.profile_step"


def _state_tensors(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [t for o in optimizers for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _shared_state(optimizer: torch.optim.Optimizer) -> set[int]:
    """Storages an optimizer shares between its parameters (bitsandbytes' quantisation maps)."""
    maps = getattr(optimizer, "name2qmap", {}) or {}
    return {id(t.untyped_storage()) for t in maps.values() if isinstance(t, torch.Tensor)}


def _copy_state(state: dict[str, Any], shared: set[int]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) and id(v.untyped_storage()) not in shared else v
            for k, v in state.items()}


class Timeline:
    """The run being replayed: the tracker, the device, the autocast emulation, and placement helpers."""

    def __init__(self, tracker: StorageTracker, device: str | torch.device, compute: torch.dtype,
                 autocast_device: str) -> None:
        self.tracker, self.device, self.compute, self.autocast_device = tracker, device, compute, autocast_device
        self.meta = str(device) == "meta"
        self.keep: list[Any] = []  # what the run keeps alive to its end (optimizer state of unstepped tensors)
        self.bus_bytes = 0  # streamed weights copied to the card in one micro-batch of the training step

    def autocast(self, on: bool = True) -> Any:
        """The trainer's ``torch.autocast`` (emulated on meta, where real autocast does nothing)."""
        if not on or self.compute == torch.float32:
            return contextlib.nullcontext()
        if self.meta:
            return MetaAutocast(self.compute, self.autocast_device)
        return torch.autocast(torch.device(self.device).type, dtype=self.compute)

    def recompute(self) -> Callable[[], Any] | None:
        if not self.meta or self.compute == torch.float32:
            return None
        return lambda: MetaAutocast(self.compute, self.autocast_device, cache=False)

    def place(self, modules: list[nn.Module], host: bool) -> None:
        for m in modules:
            self.tracker.place([*m.parameters(), *m.buffers()], host)

    @contextlib.contextmanager
    def stage(self, name: str, counting: bool = True) -> Iterator[None]:
        self.tracker.stage, self.tracker.counting = name, counting
        self.tracker.phase = name
        try:
            yield
        finally:
            self.tracker.stage, self.tracker.counting = "setup", False


@contextlib.contextmanager
def rng_states_tracked(tracker: StorageTracker) -> Iterator[None]:
    """Gradient checkpointing saves the CPU generator's state (5 KB) per checkpointed block until backward
    recomputes it; ``torch.get_rng_state`` makes that tensor outside the dispatcher, so it is registered
    here: host memory beside a card, the card's own memory when the card is the CPU."""
    original = torch.get_rng_state

    def tracked() -> torch.Tensor:
        state = original()
        tracker.register(state, "activations", host=True)
        return state

    torch.get_rng_state = tracked
    try:
        yield
    finally:
        torch.get_rng_state = original


def _empty(shape: tuple[int, ...], device: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=dtype)


def _ids(batch: int, tokens: int, device: Any) -> torch.Tensor:
    return torch.zeros(batch, tokens, dtype=torch.long, device=device)


def encode_prompt(built: Built, batch: int, device: Any,
                  visit: Callable[[nn.Module], Any] | None = None) -> dict[str, torch.Tensor]:
    """What ``pipe.encode_prompt`` allocates: each text encoder's hidden states (SDXL: the penultimate
    ones, concatenated, and the pooled embedding of the second), in the text encoders' dtype; ``visit(te)``:
    a context each encoder runs in (memory.text_encoders=sequential brings it to the card for its forward)."""
    visit = visit or (lambda _te: contextlib.nullcontext())
    if built.sdxl:
        states, pooled = [], None
        for te in built.text_encoders:
            with visit(te):
                out = te(_ids(batch, built.text_tokens, device), output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
            del out
        embeds = torch.concat(states, dim=-1).to(built.text_encoders[-1].dtype)
        return {"embeds": embeds.repeat(1, 1, 1), "pooled": pooled.repeat(1, 1)}
    with visit(built.text_encoders[0]):
        embeds = built.text_encoders[0](_ids(batch, built.text_tokens, device))[0]
    return {"embeds": embeds.to(built.text_encoders[0].dtype).repeat(1, 1, 1)}


def text_place(built: Built, wl: Workload, knobs: Knobs) -> str:
    """Where the run's frozen text encoders encode (``memory.text_encoders``; card where the setting does not
    apply: trained or every-step text encoders, from-scratch jobs)."""
    from .workloads import text_placement_applies

    return knobs.text_encoders if not built.text_trained and text_placement_applies(wl, knobs) else "card"


def encode_placed(built: Built, batch: int, tl: Timeline, place: str) -> dict[str, torch.Tensor]:
    """``FinetuneJob.encode_text`` under ``memory.text_encoders``: both encoders on the card, each visiting it
    for its own forward (``text_cache.visit_device``), or on the CPU (all of it in host memory)."""
    if place == "cpu":
        tl.tracker.host_births = True
        try:
            return encode_prompt(built, batch, tl.device)
        finally:
            tl.tracker.host_births = False
    if place == "sequential":
        @contextlib.contextmanager
        def visiting(te: nn.Module) -> Iterator[None]:
            tl.place([te], host=False)
            try:
                yield
            finally:
                tl.place([te], host=True)

        return encode_prompt(built, batch, tl.device, visit=visiting)
    return encode_prompt(built, batch, tl.device)


def cached_prompt(built: Built, batch: int, device: Any) -> dict[str, torch.Tensor]:
    """A prompt's cached encoding handed to the pipeline (``text_cache.PreviewText``): copied to the card."""
    te = built.text_encoders[-1]
    width = sum(int(t.config.hidden_size) for t in built.text_encoders) if built.sdxl else int(te.config.hidden_size)
    c = {"embeds": _empty((batch, built.text_tokens, width), device, te.dtype)}
    if built.sdxl:
        c["pooled"] = _empty((batch, int(te.config.projection_dim)), device, te.dtype)
    return c


def _scratch_text(built: Built, batch: int, device: Any) -> torch.Tensor:
    """``ScratchJob.encode_text``: the text encoder's last hidden states (with grad when it trains)."""
    grad = torch.enable_grad() if built.text_trained and torch.is_grad_enabled() else torch.no_grad()
    with grad:
        return built.text_encoders[0](_ids(batch, built.text_tokens, device))[0]


def _latents_of(built: Built, batch: int, resolution: int, device: Any) -> torch.Tensor:
    """``data.cache.encode_latents`` of a batch of fp32 pixels (no autocast; the VAE's own dtype)."""
    pixels = _empty((batch, 3, resolution, resolution), device)
    with torch.no_grad():
        z = built.vae.encode(pixels.to(built.vae.dtype)).latent_dist.mode()
    return z * 1.0


def _step_inputs(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, batch: int) -> tuple[Any, Any]:
    """(x0, conditioning thunk) of one micro-batch as the job's ``batch`` and ``loss`` make them."""
    device = tl.device
    if wl.from_scratch:
        x0 = _empty((batch, *built.latent_shape), device)
        tl.tracker.mark(x0, "inputs")
        return x0, lambda: (_scratch_text(built, batch, device), None)
    if knobs.cache_latents:
        x0 = _empty((batch, *built.latent_shape), device)
    else:  # encoded from the images every step, outside autocast, before the loss
        x0 = _latents_of(built, batch, wl.resolution, device).float()
    tl.tracker.mark(x0, "inputs")
    cached_text = knobs.cache_text and not built.text_trained and not wl.text_every_step

    def cond() -> tuple[torch.Tensor, dict[str, Any] | None]:
        if cached_text:
            c = cached_prompt(built, batch, device)
            for t in c.values():
                tl.tracker.mark(t, "inputs")
        else:
            grad = torch.enable_grad() if built.text_trained else torch.no_grad()
            with grad:
                c = encode_prompt(built, batch, device)
        kwargs = None
        if built.sdxl:
            mask = torch.ones(batch, device=device)
            c = {k: v * mask.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in c.items()}
            kwargs = {"added_cond_kwargs": {"text_embeds": c["pooled"],
                                            "time_ids": _empty((batch, 6), device).to(c["pooled"].dtype)}}
        return c["embeds"], kwargs

    return x0, cond


def _optimizers(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> tuple[Any, list[torch.optim.Optimizer]]:
    """The trainer's optimizer (or ``FusedBackward``), with the state a steady-state step has.

    Per-tensor optimizers give every tensor of one shape the same state, so only one tensor per (shape,
    dtype) is stepped to create it; the others get copies (exact bytes, much faster on SD-size models).
    """
    from ..optim import FusedBackward, build_optimizer

    trainable = built.trainable
    reps: dict[tuple, nn.Parameter] = {}
    for p in trainable:
        reps.setdefault((tuple(p.shape), p.dtype), p)
    rep_ids = {id(p) for p in reps.values()}
    if knobs.fused_backward:
        fused = FusedBackward(trainable, knobs.optimizer, lr=1e-4, clip_per_param=wl.grad_clip)
        per_param = dict(zip(map(id, fused.params), fused.optimizers, strict=True))
        optimizers = [per_param[id(p)] for p in reps.values()]
    else:
        fused = build_optimizer(list(reps.values()), knobs.optimizer, lr=1e-4, foreach=False)
        optimizers = [fused]
    for p in reps.values():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        for o in optimizers:
            o.step()
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    shared = set().union(*(_shared_state(o) for o in optimizers))
    rep_state = {id(p): o.state[p] for o in optimizers for p in o.state}
    copies = []
    for p in trainable:
        if id(p) in rep_ids:
            continue
        state = _copy_state(rep_state[id(reps[(tuple(p.shape), p.dtype)])], shared)
        if knobs.fused_backward:
            per_param[id(p)].state[p] = state
        copies.append(state)
    for t in _state_tensors(optimizers) + [v for st in copies for v in st.values() if isinstance(v, torch.Tensor)]:
        tl.tracker.mark(t, "optimizer_state")
    everything = list(fused.optimizers) if knobs.fused_backward else optimizers
    # the copies stand for the state of the tensors not stepped here: they live as long as the run
    tl.keep.extend(copies)
    return fused, everything


def state_bytes(optimizers: list[torch.optim.Optimizer], copies: list[dict[str, Any]]) -> int:
    """Bytes of optimizer state: the stepped tensors' and the copies standing for the others'."""
    seen: set[int] = set()
    total = 0
    for t in _state_tensors(optimizers) + [v for st in copies for v in st.values() if isinstance(v, torch.Tensor)]:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


@contextlib.contextmanager
def _ema_swapped(ema: Any, built: Built, tl: Timeline) -> Iterator[None]:
    """``EMA.swapped``: the trained weights wait in host memory while samples are drawn from the EMA."""
    if ema is None:
        yield
        return
    tl.tracker.host_births = True  # made in host memory: `.to("cpu", copy=True)` never touches the card
    try:
        backup = [torch.empty_like(p) for p in built.trainable]
    finally:
        tl.tracker.host_births = False
    try:
        yield
    finally:
        del backup


def autoencoder_stage(wl: Workload, knobs: Knobs, tl: Timeline) -> None:
    """The latent job's first stage: an AutoencoderKL trained with AdamW, as ``train_autoencoder`` does."""
    from ..models import scratch
    from ..optim import build_optimizer

    spec = scratch.get_spec(wl.model)
    spec = scratch.ModelSpec(**{**spec.__dict__, "resolution": wl.resolution})
    vae = scratch.build_vae(spec, device=tl.device)
    params = list(vae.parameters())
    for p in params:
        tl.tracker.register(p, "trainable_weights")
    opt = build_optimizer(params, "adamw", lr=1e-3, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for t in _state_tensors([opt]):
        tl.tracker.mark(t, "optimizer_state")
    with tl.stage("autoencoder"):
        x = _empty((knobs.batch_size, 3, wl.resolution, wl.resolution), tl.device)
        tl.tracker.mark(x, "inputs")
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon.float(), x.float())
        loss = loss + 1e-6 * 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()
        del posterior, z, recon
        tl.tracker.phase = "backward"
        loss.backward()
        del loss
        tl.tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    del opt, vae, params


def host_data(wl: Workload, built_shape: tuple[int, int, int] | None, tl: Timeline) -> list[torch.Tensor]:
    """The builtin dataset the run keeps in memory (pixels; a latent job its latents too)."""
    if not wl.host_images:
        return []
    n, r = wl.host_images, wl.resolution
    val = 64 if wl.validation_items else 0
    data = [_empty((n + val, 3, r, r), tl.device)]
    if wl.task == "text2img" and val:
        data.append(_empty((val, 3, r, r), tl.device))  # the validation batch, indexed out of them
    if wl.task == "latent" and built_shape is not None:
        data.append(_empty((n + val, *built_shape), tl.device))
    for t in data:
        tl.tracker.register(t, "inputs", host=True)
    return data


def cache_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> None:
    """Encoding the caches, before the optimizer exists: the VAE on one micro-batch of images, the text
    encoders on a batch of captions (fine-tunes); the latent job's encoding of its images (from scratch).
    Not for FLUX.1 (``built.step_loss``): it has no trainer yet, so no cache stage to replay."""
    if built.step_loss is not None:
        return
    with tl.stage("cache"), torch.no_grad():
        if built.vae is not None and (knobs.cache_latents or wl.from_scratch):
            z = _latents_of(built, knobs.batch_size, wl.resolution, tl.device)
            del z
        if not wl.from_scratch and knobs.cache_text and not built.text_trained:
            c = encode_placed(built, wl.text_cache_batch, tl, text_place(built, wl, knobs))
            del c


def train_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, notes: list[str]) -> tuple[Any, list]:
    """One steady-state training step (accumulated gradients alive for the last micro-batch), the EMA update."""
    from ..ema import EMA
    from ..train.finetune import prior_preservation_loss
    from ..train.step import compute_loss, optimizer_step

    tracker = tl.tracker
    trainable = built.trainable

    def on_grad(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.mark(p.grad, "gradients")

    # registered before FusedBackward's own hooks, which step and free each gradient
    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in trainable]
    optimizer, optimizers = _optimizers(built, wl, knobs, tl)
    ema = None
    model = nn.ModuleDict(built.trained)
    if wl.ema:
        ema = EMA(model, decay=0.999)
        for t in ema.shadow.values():
            tracker.mark(t, "ema")
        if knobs.ema_on_cpu:
            tracker.place(list(ema.shadow.values()), host=True)
            notes.append("EMA kept in CPU memory: not on the card")
    if knobs.grad_accum > 1:  # the last micro-batch runs with the earlier ones' gradients alive
        for p in trainable:
            p.grad = torch.zeros_like(p)
            tracker.mark(p.grad, "gradients")
    factor = 2 if wl.prior else 1
    batch = knobs.batch_size * factor
    acp = torch.linspace(0.9999, 0.005, 1000, device=tl.device)
    tracker.mark(acp, "inputs")

    def step_loss() -> torch.Tensor:
        if built.step_loss is not None:  # a family with its own objective (FLUX.1: flow matching)
            from .flux_workload import step_inputs

            inp = step_inputs(built, knobs, wl.resolution, batch, tl.device)
            for t in inp.values():
                tracker.mark(t, "inputs")
            with tl.autocast():
                return built.step_loss(built, inp)
        x0, cond_of = _step_inputs(built, wl, knobs, tl, batch)
        # Like the training loop: autocast around the loss only (checkpoint recomputation re-enters it)
        with tl.autocast():
            cond, kwargs = cond_of()
            loss = compute_loss(built.unet, x0, cond, alphas_cumprod=acp, prediction=built.prediction,
                                unet_kwargs=kwargs, snr_gamma=wl.snr_gamma, reduce=not wl.prior)
            if wl.prior:
                loss = prior_preservation_loss(loss, knobs.batch_size, 1.0)[0]
        return loss

    streamer = built.streamer
    fetched = 0
    if streamer is not None:  # the steady state: a first forward teaches the streamer the blocks' order
        with tl.stage("setup", counting=False), torch.no_grad():
            step_loss()
        fetched = streamer.stats.fetched_bytes
    window = torch.profiler.record_function(STEP_RANGE)  # lets the fidelity check find the step
    window.__enter__()
    try:
        with tl.stage("train"):
            tracker.phase = "forward"
            loss = step_loss()
            tracker.phase = "backward"
            loss.backward()
            del loss
            if streamer is not None:
                tl.bus_bytes = streamer.stats.fetched_bytes - fetched
            tracker.phase = "optimizer"
            if not knobs.fused_backward:
                optimizer_step(optimizer, trainable, grad_clip=wl.grad_clip)
            for p in trainable:  # what zero_grad(set_to_none) does to the tensors not stepped here
                p.grad = None
            if ema is not None:
                ema.update(model)
    finally:
        window.__exit__(None, None, None)
        for h in hooks:
            h.remove()
        if knobs.fused_backward:
            optimizer.remove()
    return ema, optimizers


def validation_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, ema: Any) -> None:
    """``ScratchJob.validate``: the held-out batch at fixed timesteps, the UNet in micro-batches, EMA weights.

    ``diffusion.validation_loss`` allocates the same tensors for every chunk and timestep; the profile runs
    the UNet once, on the last chunk of the second timestep, with what is alive then: the batch's x0, noise,
    noisy, the first timestep's output and the earlier chunks' outputs."""
    v, b = wl.validation_items, min(knobs.batch_size, wl.validation_items)
    device = tl.device
    with tl.stage("validation"), torch.no_grad(), _ema_swapped(ema, built, tl):
        x0 = _empty((v, *built.latent_shape), device)
        cond = _scratch_text(built, v, device)
        out_shape = (v, *built.latent_shape)
        previous = _empty(out_shape, device)  # the first timestep's output, alive until reassigned
        noise = torch.randn(out_shape, dtype=torch.float32).to(device)
        t = torch.full((v,), 1, dtype=torch.long, device=device)
        noisy = x0 * 1.0 + noise * 1.0
        parts = [_empty((b, *built.latent_shape), device) for _ in range(-(-v // b) - 1)]
        parts.append(built.unet(noisy[-b:], t[-b:], encoder_hidden_states=cond[-b:]).sample)
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
        loss = ((out.float() - noise.float()) ** 2).mean()
        del loss, out, previous, noisy, noise, t, x0, cond


def preview_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, ema: Any,
                   offloaded: list[nn.Module], cached_text: bool = False) -> None:
    """The sample grid: EMA weights swapped in, the frozen helpers back on the card, one image (fine-tune:
    one prompt at a time, under autocast) or every prompt at once (from scratch, fp32) sampled and decoded;
    ``cached_text``: the prompts come from the text cache (``offloaded`` then holds no text encoder)."""
    tl.place(offloaded, host=False)
    try:
        with tl.stage("preview"), torch.no_grad(), _ema_swapped(ema, built, tl):
            _draw(built, wl, tl, wl.preview, "cached" if cached_text else "card")
    finally:
        tl.place(offloaded, host=True)


def class_image_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> None:
    """Drawing the missing class images (data.num_class_images) with the base model before caching: every
    frozen weight on the card, one image at a time with guidance, decoded by the VAE (``FinetuneJob.draw_base``)."""
    with tl.stage("class images"), torch.no_grad():
        _draw(built, wl, tl, Preview(prompts=1, guided=True, size=None), text_place(built, wl, knobs))


def _draw(built: Built, wl: Workload, tl: Timeline, pv: Preview, text: str = "card") -> None:
    """One sampling step of ``pv``'s images (every step is the same; the previous output alive) + the decode.
    ``text``: the prompt encoded by the pipeline on the card (``card``), read from the cache (``cached``), or
    encoded first under ``memory.text_encoders`` (``sequential``, ``cpu``) and handed over as embeddings."""
    from ..diffusion import make_scheduler_config
    from ..sample import make_sampler, sample

    h, w = pv.size or (wl.resolution, wl.resolution)
    n = pv.prompts if wl.from_scratch else 1
    factor = built.vae_factor
    shape = (n, built.latent_shape[0], h // factor, w // factor)
    scheduler = make_sampler("ddim", make_scheduler_config("linear", 1000, built.prediction))
    if text in ("sequential", "cpu") and not wl.from_scratch:
        # FinetuneJob.generate encodes the prompt and its negative first, outside autocast, off the card or
        # one encoder at a time; the pipeline then gets the embeddings
        encoded = encode_placed(built, 2, tl, text)
        del encoded
    with tl.autocast(not wl.from_scratch):
        if wl.from_scratch:
            cond = _scratch_text(built, n, tl.device)
            uncond = _scratch_text(built, n, tl.device)
            kwargs: dict[str, Any] = {}
            dtype = torch.float32
        else:
            encode = encode_prompt if text == "card" else cached_prompt
            c, u = encode(built, 1, tl.device), encode(built, 1, tl.device)
            cond, uncond, dtype = c["embeds"], u["embeds"], c["embeds"].dtype
            kwargs = built.unet_kwargs(2 if pv.guided else 1, tl.device, dtype)

        # every sampling step is the same: one is run, with the previous step's output alive
        previous = _empty(((2 if pv.guided else 1) * n, *shape[1:]), tl.device)

        def denoise(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return built.unet(x, t, encoder_hidden_states=c, **kwargs).sample

        x = sample(denoise, shape, scheduler=scheduler, cond=cond, uncond=uncond,
                   guidance_scale=3.0 if pv.guided else 1.0, steps=1, device=tl.device, dtype=dtype)
        del cond, uncond, previous
    if built.vae is not None:  # decoded outside autocast, in the VAE's dtype
        images = built.vae.decode(x.to(built.vae.dtype)).sample.float()
        del images
