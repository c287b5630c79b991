"""One chat completion or completion request, from the validated body to the OpenAI answer.

A job turns the body into prompt ids and `SamplingParams` (checking the context and the tool
choice), then consumes the engine's events: `on_event` returns the SSE chunks to send (when
streaming) and keeps what the final `response()` needs.
"""

from __future__ import annotations

from typing import Any

from llamaworks.chat import calls as C
from llamaworks.chat import reasoning as think
from llamaworks.chat.formats import detect_format, render
from llamaworks.chat.parse import ParseResult, ToolCall, ToolCallStreamer, new_call_id
from llamaworks.errors import LlamaworksError
from llamaworks.infer.continuous import ContinuousEngine, Event
from llamaworks.infer.sampling import SamplingParams
from llamaworks.infer.sequence import RequestOutput
from llamaworks.serve import responses as R
from llamaworks.serve.schemas import APIError, ChatRequest, CompletionRequest, NamedToolChoice


def _context_error(n_prompt: int, max_tokens: int | None, ctx: int, param: str) -> APIError:
    asked = f", and {max_tokens} for the completion" if max_tokens else ""
    return APIError(400, f"this model's context is {ctx} tokens; the request has {n_prompt} "
                    f"in the prompt{asked}: shorten the prompt or lower max_tokens", param=param,
                    code="context_length_exceeded")


def _check_n(n: int, engine: ContinuousEngine) -> None:
    if n > engine.max_batch:
        raise APIError(400, f"n={n} is more than this server decodes at once "
                       f"({engine.max_batch}, --max-batch)", param="n", code="invalid_value")


def _budget(n_prompt: int, asked: int | None, default: int, ctx: int, param: str) -> int:
    """max_tokens for a prompt of n_prompt tokens; 400 when the context cannot hold it."""
    if n_prompt >= ctx:
        raise _context_error(n_prompt, None, ctx, param)
    if asked is None:
        return min(default, ctx - n_prompt)
    if asked > ctx - n_prompt:
        raise _context_error(n_prompt, asked, ctx, "max_tokens")
    return asked


def _json_schema(body: ChatRequest | CompletionRequest, engine: ContinuousEngine
                 ) -> dict[str, Any] | None:
    """The schema `response_format` asks for, compiled now so that one the grammar engine cannot
    enforce is a 400 naming what it refused (never silently ignored)."""
    if body.response_format is None:
        return None
    try:
        schema = body.response_format.schema_or_none()
    except ValueError as e:
        raise APIError(400, str(e), param="response_format", code="invalid_value") from None
    return None if schema is None else _enforceable(engine, schema, "response_format")


def _enforceable(engine: ContinuousEngine, schema: dict[str, Any] | None, param: str,
                 grammar: str | None = None) -> dict[str, Any] | None:
    """`schema` (or `grammar`) once the grammar engine compiled it; else a 400 with its reason."""
    from llamaworks.infer.grammar import GrammarError

    try:
        engine.engine.grammars.compile(json_schema=schema, grammar=grammar)
    except GrammarError as e:
        raise APIError(400, f"{param}: this JSON schema cannot be enforced: {e}", param=param,
                       code="invalid_value") from None
    return schema


class ChatJob:
    """A /v1/chat/completions request."""

    def __init__(self, engine: ContinuousEngine, body: ChatRequest, model: str,
                 default_max_tokens: int, reasoning_format: str = "auto"):
        _check_n(body.n, engine)
        tok = engine.tokenizer
        self.tok, self.body, self.model = tok, body, model
        self.fmt = detect_format(tok)
        self.stream = body.stream
        self.id, self.created = R.new_id("chatcmpl"), R.now()
        choice = body.tool_choice
        tools = body.tools if body.tools and choice != "none" else None
        names = [t.function.name for t in tools or []]
        self.prefix, self.args_head, self.forced = "", "", None
        self.call_schema: dict[str, Any] | None = None
        self.call_grammar: str | None = None
        if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
            self._can_force("'required'" if choice == "required" else "naming a function")
        if choice == "required" and len(names) == 1:  # the only tool it may call
            choice = NamedToolChoice(type="function", function={"name": names[0]})
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not "
                               "among the request's tools", param="tool_choice")
            self.forced = choice.function.name
            fn = next(t.function for t in tools or [] if t.function.name == self.forced)
            # the arguments are generated under the function's own parameters schema, after an
            # opening (`{"first_property": `) that keeps small models filling in a value
            self.call_schema = _enforceable(engine, fn.parameters or {"type": "object"},
                                            "tools")
            self.args_head = R.arguments_head(fn.parameters)
            self.prefix = C.forced_call_prefix(self.fmt, self.forced, C.has_args_marker(tok)) + \
                self.args_head
        elif choice == "required":
            if not tools:
                raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
            self.prefix = C.forced_call_prefix(self.fmt, None, C.has_args_marker(tok))
            # which function, and its arguments, under a grammar of the declared schemas
            self.call_grammar = C.forced_call_grammar(
                self.fmt, [(t.function.name, t.function.parameters) for t in tools],
                C.has_args_marker(tok))
            if self.call_grammar is not None:
                _enforceable(engine, None, "tools", self.call_grammar)
        self.tools_on = tools is not None
        self.lazy = None  # tool_choice auto: calls follow the declared tools once one begins
        if tools and not self.prefix:
            self.lazy = C.lazy_call_grammar(
                self.fmt, [(t.function.name, t.function.parameters) for t in tools],
                C.has_args_marker(tok))
            if self.lazy is not None:
                _enforceable(engine, None, "tools", self.lazy[1])
        schemas = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        kwargs = dict(body.chat_template_kwargs or {})
        if body.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", body.reasoning_effort)
        try:
            text = render(tok, [m.to_render() for m in body.messages], schemas,
                          add_generation_prompt=True, template_kwargs=kwargs)
        except (LlamaworksError, ValueError, TypeError, LookupError) as e:
            raise APIError(400, f"cannot render these messages with the model's chat "
                           f"template: {e}", param="messages") from None
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError and raise_exception
            raise APIError(400, f"the chat template rejected these messages: {e}",
                           param="messages") from None
        ids = tok.encode(text + self.prefix, bos=False)
        self.prompts = [ids]
        # reasoning: split <think> blocks off the answer (always with "deepseek", with "auto"
        # when the model's template knows them or the prompt opens one)
        self.in_thought = think.opens_in_thought(text + self.prefix)
        knows = think.OPEN in (tok.chat_template or "") or self.in_thought
        self.reasoning = reasoning_format == "deepseek" or (reasoning_format == "auto" and knows)
        self.in_thought = self.reasoning and self.in_thought
        grammar = self.call_grammar
        if grammar is None and body.guided_grammar is not None:
            _enforceable(engine, None, "guided_grammar", body.guided_grammar)
            grammar = body.guided_grammar
        asked = body.max_completion_tokens or body.max_tokens
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        if self.prefix and self.call_schema is None and self.call_grammar is None:
            stop = stop + R.forced_call_stop(self.fmt)  # (a grammar ends the call itself; a
            # stop string could match inside one of its JSON strings)
        self.top = body.top_logprobs or 0
        schema = None if grammar else self.call_schema or _json_schema(body, engine)
        self.params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, n=body.n,
            max_tokens=_budget(len(ids), asked, default_max_tokens, engine.context, "messages"),
            stop=stop, logprobs=self.top if body.logprobs else None,
            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
            json_schema=schema, grammar=grammar,
            grammar_prefix=self.args_head if self.call_schema else "",
            lazy_grammar=self.lazy if grammar is None and schema is None else None)
        self.streamers = [self._streamer() for _ in range(body.n)]
        self.thinking = [think.ReasoningStreamer(self.in_thought) if self.reasoning else None
                         for _ in range(body.n)]
        self.texts = [""] * body.n
        self.result: RequestOutput | None = None
        self.error: str | None = None

    def _can_force(self, what: str) -> None:
        """400 when the chat format's calls cannot be forced (gemma's are Python code, which
        neither the forced call prefix nor the call grammar covers)."""
        if self.fmt not in C.FORCED_CALL_FORMATS:
            raise APIError(400, f"tool_choice {what} cannot be enforced for this model's chat "
                           f"format ({self.fmt}: tool calls are Python code in ```tool_code "
                           "blocks, which the tool-call grammar does not cover); use "
                           "tool_choice 'auto'", param="tool_choice", code="invalid_value")

    def _streamer(self) -> ToolCallStreamer | None:
        if not self.tools_on:
            return None
        s = ToolCallStreamer(self.fmt)
        s.feed(self.prefix)
        return s

    def _parse(self, text: str) -> ParseResult | None:
        """Tool calls in a choice's generated text (after the forced prefix, if any)."""
        if not self.tools_on:
            return None
        if self.forced:
            args = R.forced_arguments(self.args_head + text)
            if args is not None:
                return ParseResult("", [ToolCall(new_call_id(), self.forced, args)])
        return R.parse_calls(self.prefix + text, self.fmt)

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: Any = None) -> dict[str, Any]:
        return R.chunk(self.id, self.model, self.created,
                       [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}])

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk(i, {"role": "assistant", "content": ""})
                for i in range(self.body.n)]

    def on_event(self, _: int, ev: Event) -> list[dict[str, Any]]:
        if ev.done:
            self.result, self.error = ev.result, ev.error
            return [{"error": APIError(500, ev.error, "server_error").body()["error"]}] \
                if ev.error and self.stream else []
        if not self.stream:
            return []
        out = []
        streamer, thinking = self.streamers[ev.index], self.thinking[ev.index]
        self.texts[ev.index] += ev.text
        answer = ev.text
        if thinking is not None:
            thought, answer = thinking.feed(ev.text)
            if ev.finish_reason:
                more, rest = thinking.flush()
                thought, answer = thought + more, answer + rest
            if thought:
                out.append(self._chunk(ev.index, {"reasoning_content": thought}))
        text = streamer.feed(answer) if streamer else answer
        lps = None
        if self.body.logprobs and ev.logprobs:
            lps = {"content": R.chat_logprobs(self.tok, ev.token_ids, ev.logprobs, self.top)}
        if text or lps:
            out.append(self._chunk(ev.index, {"content": text}, logprobs=lps))
        if ev.finish_reason:
            finish = ev.finish_reason
            if streamer:
                res = self._parse(self._split(self.texts[ev.index])[1])
                assert res is not None
                rest = streamer.remaining_content(res)
                if rest and not res.calls:
                    out.append(self._chunk(ev.index, {"content": rest}))
                if res.calls:
                    finish = "tool_calls"
                    out.append(self._chunk(ev.index, {"tool_calls": R.tool_call_deltas(res)}))
            out.append(self._chunk(ev.index, {}, finish))
        return out

    def _split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of a choice's text (no reasoning unless the job splits it)."""
        return think.split_reasoning(text, self.in_thought) if self.reasoning else (None, text)

    def _reasoning_tokens(self, ids: list[int]) -> int:
        """How many of `ids` are the reasoning block: up to the shortest prefix whose text
        closes it (binary search over decodes); all of them if it never closes."""
        if not self.reasoning or self._split(self.tok.decode(ids))[0] is None:
            return 0

        def closed(k: int) -> bool:
            return think.CLOSE in self.tok.decode(ids[:k])

        lo, hi = 0, len(ids)
        if not closed(hi):
            return hi
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if closed(mid) else (mid + 1, hi)
        return lo

    def _usage(self) -> dict[str, Any]:
        assert self.result is not None
        u = R.usage(len(self.result.prompt_token_ids),
                    sum(len(o.token_ids) for o in self.result.outputs),
                    self.result.num_cached_tokens)
        u["completion_tokens_details"] = {"reasoning_tokens": sum(
            self._reasoning_tokens(o.token_ids) for o in self.result.outputs)}
        return u

    def last_chunks(self) -> list[dict[str, Any]]:
        opts = self.body.stream_options
        if self.result is None or not (opts and opts.include_usage):
            return []
        return [R.chunk(self.id, self.model, self.created, [], usage=self._usage())]

    def response(self) -> dict[str, Any]:
        if self.error or self.result is None:
            raise APIError(500, self.error or "no result", "server_error")
        choices = []
        for o in self.result.outputs:
            thought, answer = self._split(o.text)
            parsed = self._parse(answer)
            message, called = R.chat_message(answer, parsed)
            if thought is not None:
                message["reasoning_content"] = thought
            lps = None
            if self.body.logprobs:
                lps = {"content": R.chat_logprobs(self.tok, o.token_ids, o.logprobs or [],
                                                  self.top)}
            choices.append({"index": o.index, "message": message, "logprobs": lps,
                            "finish_reason": "tool_calls" if called else o.finish_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices,
                "usage": self._usage()}


class CompletionJob:
    """A /v1/completions request (one or several prompts, text or token ids)."""

    def __init__(self, engine: ContinuousEngine, body: CompletionRequest, model: str):
        _check_n(body.n, engine)
        self.tok, self.body, self.model = engine.tokenizer, body, model
        self.stream = body.stream
        self.id, self.created = R.new_id("cmpl"), R.now()
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        vocab = engine.model.config.vocab_size
        self.prompts = []
        for q in prompts:
            if not isinstance(q, str) and any(not 0 <= t < vocab for t in q):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = self.tok.encode(q, bos=None) if isinstance(q, str) else list(q)
            if not ids:
                raise APIError(400, "a prompt is empty (and this model adds no BOS token)",
                               param="prompt", code="invalid_value")
            try:
                self.prompts.append(engine.encode(ids))
            except ValueError as e:
                raise APIError(400, str(e), param="prompt",
                               code="context_length_exceeded") from None
        longest = max(len(q) for q in self.prompts)
        budget = _budget(longest, body.max_tokens, 16, engine.context, "prompt")
        self.top = body.logprobs
        self.params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, n=body.n,
            max_tokens=budget, stop=body.stop, logprobs=body.logprobs,
            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
            json_schema=_json_schema(body, engine))
        self.texts = [self.tok.decode(q) if body.echo else "" for q in self.prompts]
        self.results: dict[int, RequestOutput] = {}
        self.error: str | None = None
        self.offsets: dict[int, int] = {}

    def _choice(self, j: int, i: int, text: str, finish: str | None, lps: Any) -> dict[str, Any]:
        return {"index": j * self.body.n + i, "text": text, "logprobs": lps,
                "finish_reason": finish}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return R.chunk(self.id, self.model, self.created, choices, "text_completion", **extra)

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk([self._choice(j, i, t, None, None) for i in range(self.body.n)])
                for j, t in enumerate(self.texts) if t]

    def on_event(self, j: int, ev: Event) -> list[dict[str, Any]]:
        if ev.done:
            if ev.error:
                self.error = ev.error
                return [{"error": APIError(500, ev.error, "server_error").body()["error"]}] \
                    if self.stream else []
            self.results[j] = ev.result
            return []
        if not self.stream:
            return []
        lps = None
        if self.top is not None and ev.logprobs:
            key = j * self.body.n + ev.index
            off = self.offsets.get(key, 0)
            lps = R.completion_logprobs(self.tok, ev.token_ids, ev.logprobs, self.top, off)
            self.offsets[key] = off + sum(len(t) for t in lps["tokens"])
        if not (ev.text or lps or ev.finish_reason):
            return []
        return [self._chunk([self._choice(j, ev.index, ev.text, ev.finish_reason, lps)])]

    def _usage(self) -> dict[str, Any]:
        rs = self.results.values()
        return R.usage(sum(len(r.prompt_token_ids) for r in rs),
                       sum(len(o.token_ids) for r in rs for o in r.outputs),
                       sum(r.num_cached_tokens for r in rs))

    def last_chunks(self) -> list[dict[str, Any]]:
        opts = self.body.stream_options
        if self.error or not (opts and opts.include_usage):
            return []
        return [self._chunk([], usage=self._usage())]

    def response(self) -> dict[str, Any]:
        if self.error:
            raise APIError(500, self.error, "server_error")
        choices = []
        for j in range(len(self.prompts)):
            for o in self.results[j].outputs:
                lps = None
                if self.top is not None:
                    lps = R.completion_logprobs(self.tok, o.token_ids, o.logprobs or [],
                                                self.top, len(self.texts[j]))
                choices.append(self._choice(j, o.index, self.texts[j] + o.text,
                                            o.finish_reason, lps))
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices,
                "usage": self._usage()}
