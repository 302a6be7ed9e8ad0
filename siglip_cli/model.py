"""Load a SigLIP / SigLIP 2 checkpoint (Hub id or local folder) and encode images and texts with it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import compat
from .checkpoint import cannot_load, download_note, hf_quiet, image_spec, stored_scalars, towers
from .config import TEXT_LENGTH, ModelConfig, usable_cpus
from .devices import Placement, default_batch_size, place
from .encoders.torch_text import TorchText, WholeTower
from .errors import RunError, first_line
from .loader import Batch
from .text import prepare
from .weights import cached_commit, fingerprint


@dataclass(frozen=True)
class ModelInfo:
    """What the output's metadata records about the model, so that a file explains itself later."""

    name: str
    revision: str | None  # as asked for
    commit: str | None  # as resolved on the Hub (None for a local folder)
    architecture: str
    dim: int
    text_length: int
    preprocessing: str


class Encoder:
    """A checkpoint on its device: L2-normalized image and text embeddings, and the logit scale and bias."""

    def __init__(
        self,
        model,
        processor,
        tokenizer,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        scalars: dict[str, float] | None = None,
        config=None,
        openvino: dict | None = None,
        text_openvino: dict | None = None,
    ):
        """model: a whole SiglipModel / Siglip2Model, or only its vision tower (then `config` is the checkpoint's
        whole config, `scalars` hold the logit scale and bias, and the text tower and the tokenizer are loaded
        from cfg's checkpoint the first time texts are encoded). openvino: the image tower on OpenVINO (see
        _image_tower); text_openvino: the text tower too, dict(precision, threads) (encoders/openvino_text.py)."""
        whole = hasattr(model, "get_image_features")  # the public API of a whole model; a tower is called
        self.config = model.config if whole else config
        self.device, self.dtype, self.text_dtype = device, dtype, model.dtype
        model = model.to(device).eval()
        self.vision = WholeTower(model, "get_image_features") if whole else model
        self._tokenizer, self._source = tokenizer, (cfg.name, cfg.commit or cfg.revision)
        self.text_rules = cfg.text_rules
        self.naflex = self.config.model_type == "siglip2"
        self.spec = image_spec(processor, self.naflex, cfg.max_patches)
        # --max-patches as an output records it (see weights.patches_setting): None for the checkpoint's own
        self.patches = (
            self.spec.max_patches if self.naflex and self.spec.max_patches != processor.max_num_patches else None
        )
        scale = float(getattr(processor, "rescale_factor", 1 / 255))
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)
        # (x * scale - mean) / std == x * a + b, folded once
        self.pixel_scale, self.pixel_shift = scale / std, -mean / std
        # float32 as stored (see stored_scalars); logit_scale is stored as a log
        scalars = dict(scalars or {})
        if whole:
            scalars.setdefault("logit_scale", model.logit_scale.detach().float().item())
            scalars.setdefault("logit_bias", model.logit_bias.detach().float().item())
        self.logit_scale, self.logit_bias = math.exp(scalars["logit_scale"]), scalars["logit_bias"]
        text_length = int(getattr(self.config.text_config, "max_position_embeddings", TEXT_LENGTH))
        architecture = (getattr(self.config, "architectures", None) or [type(model).__name__])[0]
        self.info = ModelInfo(
            name=cfg.name,
            revision=cfg.revision,
            commit=cfg.commit or cached_commit(cfg.name, cfg.revision),
            architecture=architecture,
            dim=int(self.config.vision_config.hidden_size),
            text_length=text_length,
            preprocessing=(
                f"naflex patch={self.spec.patch_size} max_patches={self.spec.max_patches}"
                if self.naflex
                else f"resize {self.spec.width}x{self.spec.height}"
            )
            + f" resample={self.spec.resample.name.lower()} mean={processor.image_mean} std={processor.image_std}",
        )
        self.fingerprint = fingerprint(cfg.name, self.info.commit)
        self.chunk = 0  # after running out of memory: images per forward pass (0: the whole batch)
        self.pad_to = 0  # with --compile: pad every batch to this size, so one compiled graph serves them all
        torch_text = TorchText(self, WholeTower(model, "get_text_features") if whole else None)
        self.text_tower = torch_text  # what runs the text tower, chosen once (an OpenVINO one falls back within)
        if text_openvino is not None:
            from .encoders.openvino_text import OpenVINOText

            self.text_tower = OpenVINOText(self, torch_text, **text_openvino)
        self.tower, self.backend, self.quantize = self._image_tower(cfg.compile, openvino)

    def _image_tower(self, compile: bool, openvino: dict | None):
        """What runs the image tower, chosen once: (callable, backend, quantize). OpenVINO where it was asked for
        (dict(dtype, quantize, threads, batch)) and can be had here, else torch (eager, or compiled)."""
        if openvino is not None:
            from .encoders.openvino import image_tower

            self.dtype = openvino["dtype"]
            tower = image_tower(self, **openvino)  # None: it cannot be converted here (said why)
            if tower is not None:
                return tower, "openvino", openvino["quantize"]
            self.vision.to(self.dtype)  # loaded in float32 for the converter
        tower = self._naflex if self.naflex else self._fixed
        return (self._compiled(tower) if compile else tower), "torch", "none"

    @classmethod
    def load(
        cls,
        cfg: ModelConfig,
        show_downloads: bool = False,
        batch_size: int | None = None,
        text_openvino=None,
        placement=None,
    ) -> "Encoder":
        """The model on the first of cfg's devices (see load_all)."""
        return cls.load_all(cfg, show_downloads, True, batch_size, text_openvino, placement)[0]

    @classmethod
    def load_all(
        cls,
        cfg: ModelConfig,
        show_downloads: bool = False,
        first_only: bool = False,
        batch_size: int | None = None,
        text_openvino: bool | None = None,
        placement: Placement | None = None,
    ) -> list["Encoder"]:
        """Load a Hub id or a local folder, once, onto each of cfg's devices; a model that cannot be had is a
        RunError with one readable line. What runs each tower is chosen here, once.

        show_downloads: a person is watching stderr: say what a first run downloads, and show its progress.
        batch_size: the run's (default: the device's); an OpenVINO image graph is built for it.
        text_openvino: the text tower on OpenVINO where it can be had (None: where the image tower may be).
        placement: the run's, resolved once (devices.place); else resolved here from cfg.
        """
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        hf_quiet(show_downloads)
        if show_downloads and (note := download_note(cfg.name, cfg.commit or cfg.revision)):
            print(note, file=sys.stderr)
        revision = cfg.commit or cfg.revision  # the commit the run's signature was made with
        try:
            config = AutoConfig.from_pretrained(cfg.name, revision=revision)
            placement = placement or place(cfg, config.model_type == "siglip2")
            devices, dtype, backend = list(placement.devices), placement.dtype, placement.backend
            devices = devices[:1] if first_only else devices
            cfg = dataclasses.replace(cfg, quantize=placement.quantize)
            if devices[0].type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
                torch.set_num_threads(usable_cpus())  # torch counts the machine's cores, not the container's
            load = torch.float32 if backend == "openvino" else dtype  # OpenVINO converts float32 weights
            scalars = stored_scalars(cfg.name, revision)
            classes = towers(config)
            if classes and len(scalars) == 2:  # the image tower alone: the text tower loads when texts are encoded
                model = classes[0].from_pretrained(cfg.name, revision=revision, dtype=load, attn_implementation="sdpa")
            else:  # weights whose scale and bias cannot be read on their own (.bin files): the whole model
                model = AutoModel.from_pretrained(cfg.name, revision=revision, dtype=load, attn_implementation="sdpa")
            processor = AutoImageProcessor.from_pretrained(cfg.name, revision=revision)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise RunError(cannot_load(cfg.name, e)) from None
        if not classes and (not hasattr(model, "get_image_features") or not hasattr(model, "logit_bias")):
            raise RunError(f"{cfg.name!r} is a {type(model).__name__}, not a SigLIP model")
        on_cpu = devices[0].type == "cpu" and cfg.backend != "torch" and not cfg.compile
        threads = max(1, usable_cpus() // len(devices))  # several CPU encoders share the cores
        batch = batch_size or default_batch_size(devices[0])
        ov = dict(dtype=dtype, quantize=cfg.quantize, threads=threads, batch=batch, bound=cfg.int8_bound)
        # the text tower on OpenVINO where the image tower may be (NaFlex checkpoints' too: it has one fixed
        # shape), or where asked for (the server's texts, its images on torch)
        text_ov = on_cpu if text_openvino is None else text_openvino and devices[0].type == "cpu"
        if text_ov:
            from .encoders import ovtext

            text_ov = ovtext.available() and dict(precision=ovtext.precision(dtype), threads=threads)
        encoders = []
        for i, device in enumerate(devices):
            # Each GPU gets its own copy, made on the host before the first one moves; CPU encoders share one.
            own = model if device.type == "cpu" or i == len(devices) - 1 else copy.deepcopy(model)
            encoder = cls(
                own,
                processor,
                None,
                cfg,
                device,
                load,
                scalars,
                config,
                openvino=ov if on_cpu and backend == "openvino" else None,
                text_openvino=text_ov or None,
            )
            encoders.append(encoder)
        return encoders

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded the first time texts are encoded (image runs never need it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            name, revision = self._source
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
            except (OSError, ValueError, KeyError, ImportError, TypeError, AttributeError) as e:
                # without sentencepiece, transformers 5.0 fails on SigLIP 1 tokenizers with an AttributeError
                raise RunError(cannot_load(name, e, "the tokenizer of ")) from None
        return self._tokenizer

    @property
    def text_backend(self) -> str:
        return self.text_tower.backend

    @property
    def text_kind(self) -> str:
        return self.text_tower.kind

    def load_text(self, dtype: torch.dtype):
        """The checkpoint's text tower, read from its weights in dtype (on the CPU)."""
        name, revision = self._source
        try:
            return towers(self.config)[1].from_pretrained(
                name, revision=revision, dtype=dtype, attn_implementation="sdpa"
            )
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise RunError(cannot_load(name, e, "the text tower of ")) from None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """SigLIP's text rules: cleaned (text.clean), right-padded to the trained length, truncated, EOS kept;
        input ids."""
        tokens = self.tokenizer(
            prepare(texts, self.text_rules),
            padding="max_length",
            max_length=self.info.text_length,
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        return tokens["input_ids"]

    def _compiled(self, tower):
        from .vocab import cache_dir

        # Keep inductor's artefacts where a nightly run finds them again (its default, in /tmp, is wiped on
        # reboot), unless the user chose a place. torch writes its default into the environment when it first
        # looks, so that value counts as unset.
        default = compat.inductor_default_cache_dir()
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), "inductor")
        return torch.compile(tower, dynamic=False)

    def _fixed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        x = (x * self.pixel_scale[:, None, None] + self.pixel_shift[:, None, None]).to(self.dtype)
        return F.normalize(self.vision(pixel_values=x).pooler_output.float(), dim=-1)

    def _naflex(self, x: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor, full: bool) -> torch.Tensor:
        n, patches, width = x.shape
        x = x.view(n, patches, width // 3, 3).float() * self.pixel_scale + self.pixel_shift
        x = (x.view(n, patches, width) * mask[..., None]).to(self.dtype)  # padding patches are zeros, as in HF
        # The documented inputs only: a 2-D (n, patches) mask, True = a real patch. The host knows whether any image
        # has padding; without padding no mask is passed, so transformers has nothing to ask the device about.
        attend = None if full else mask.bool()
        out = self.vision(pixel_values=x, pixel_attention_mask=attend, spatial_shapes=grids)
        return F.normalize(out.pooler_output.float(), dim=-1)

    def close(self) -> None:
        """The run is over: nothing to release for a local model."""

    def on_device(self):
        """A context in which CUDA work goes to this encoder's GPU: torch's current device is per thread and
        starts as GPU 0, so every CUDA call (allocations, streams, events) is made inside it."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def encode_images(self, batch: Batch) -> torch.Tensor:
        """Embeddings (n, D) float32 on the device for the decoded images of a batch (launched, not awaited).

        After an out-of-memory error (see shrink) the batch goes through in chunks of self.chunk images.
        """
        n = len(batch.ok)
        args = [batch.pixels] if not self.naflex else [batch.pixels, batch.patch_mask, batch.grids]
        step = self.chunk or n
        with self.on_device():
            out = [self._encode([a[i : i + step] for a in args]) for i in range(0, n, step)]
            return out[0] if len(out) == 1 else torch.cat(out)

    def _encode(self, args: list[torch.Tensor]) -> torch.Tensor:
        n = len(args[0])
        pad = max(0, self.pad_to - n)
        if pad:  # only with --compile: a last, smaller batch would otherwise compile a second graph
            args = [torch.cat([a, a[:1].expand(pad, *a.shape[1:])]) for a in args]
        # Host -> device from the batch's pinned buffer on this device's current stream. The loader gives every
        # batch a new buffer, and torch's pinned-memory cache does not hand a buffer out again before the copies
        # recorded on it are done, so the buffer is never overwritten while a copy reads it.
        x = args[0].to(self.device, non_blocking=True)
        if self.naflex:
            mask, grids = args[1], args[2]
            # Whether any image has padding patches is known here, on the host: transformers would otherwise ask
            # the device (mask.all(), twice per batch), a sync that stops the host queueing the next batch.
            full = bool(mask.all())
            args = (x, mask.to(self.device, non_blocking=True), grids, full)
        else:
            args = (x,)
        try:
            return self.tower(*args)[:n]
        except compat.compile_failures() as e:  # --compile only: the first call compiles
            first = first_line(e)
            raise RunError(f"--compile failed: {first}; run without --compile") from None

    def shrink(self, error: BaseException, batch_size: int) -> None:
        """After the device ran out of memory on a batch: halve the chunk size (the caller redoes the batch, and
        later batches go in chunks of that size); at one image, a RunError."""
        chunk = (self.chunk or batch_size) // 2
        if chunk < 1:
            first = first_line(error)
            raise RunError(
                f"one image does not fit in the memory of {self.device}: {first}; try --dtype "
                "bfloat16 or float16, a smaller --max-patches, or another --device"
            ) from None
        self.chunk = chunk
        if self.pad_to:
            self.pad_to = chunk
        if self.device.type == "cuda":
            with self.on_device():
                torch.cuda.empty_cache()  # the failed attempt's blocks, so the smaller chunks fit

    def to_host(self, tensors: dict[str, torch.Tensor]):
        """Start copying device tensors back; returns a function that waits for them and gives numpy arrays.

        On CUDA the copies go into pinned memory on this device's current stream (the stream the batch was
        computed on), behind an event recorded on that same stream, so that the host finishes one batch while the
        device runs the next. The pinned buffers are new for each batch and are read only after the event, so
        no buffer is reused early. Elsewhere they are plain copies.
        """
        if self.device.type != "cuda":
            arrays = {k: v.cpu().numpy() for k, v in tensors.items()}
            return lambda: arrays
        with self.on_device():
            stream = torch.cuda.current_stream(self.device)
            host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in tensors.items()}
            for k, v in tensors.items():
                host[k].copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)

        def wait():
            done.synchronize()  # the host waits for this event only, on this device
            return {k: v.numpy() for k, v in host.items()}

        return wait

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embeddings (n, D) float32 on the device: cleaned, right-padded to the trained length, no mask."""
        with self.on_device():
            out = [self.text_tower(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
            return torch.cat(out) if out else torch.empty((0, self.info.dim), device=self.device)
