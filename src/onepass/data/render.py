"""Conversation → `Example(input_ids, loss_mask, turn)`: render once, tokenize once, map spans.

How trained spans are found, without `{% generation %}` markers or marker token ids:
1. The whole conversation is rendered once to text T.
2. For each assistant message k, the template is also rendered on the prefix messages[:k] with
   the generation prompt (P_k: the context the model sees at inference) and on messages[:k+1]
   (Q_k: turn k as the last turn). Turn k's content is located in Q_k after P_k, as rendered
   (templates trim), and what Q_k puts after it, whitespace aside, is its end-of-turn text
   (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...).
3. The history is stable when T starts with P_k and with Q_k: then the positions in Q_k are the
   positions in T. Otherwise the template rewrites history (e.g. strips past reasoning) and the
   `unstable_history` policy decides: tree (default: each turn's inference-time render is a path of
   one tree example, shared prefixes computed once, see tree.py), error, warn (train on T as
   rendered), or split (one example per assistant turn, each with its inference-time context).
4. T is tokenized once with character offsets; a token is trained when it overlaps a trained span.

With `sanitize_control_tokens`, the control tokens inside a conversation's strings are wrapped in
transformers' markers before rendering (as `apply_chat_template(..., sanitize_control_tokens=True)`
does), spans are found in the marked text, and `tokenize_rendered` encodes what the markers wrap as
plain text, the rest as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from onepass.compat import (GENERATION_TAG, REASONING_KEYS, control_token_marks, control_token_markers,
                            encode_token_as_text,
                            generation_marks, mark_control_tokens, template_messages)
from onepass.data.chat_template import ChatTemplate
from onepass.data.types import (ChatConversation, Conversation, RawConversation, RenderedText, RenderOptions,
                                Span)
from onepass.errors import DataError, OnepassError, TemplateError


@dataclass(frozen=True)
class RenderResult:
    texts: tuple[RenderedText, ...]
    unstable: bool = False
    split: bool = False  # each text is an example of its own
    tree: bool = False  # the texts are the paths of one tree example
    notes: tuple[str, ...] = ()  # what onepass did about a property of the template, for the summary


@dataclass(frozen=True)
class TurnRender:
    """How the template renders one assistant turn: its inference-time context (messages before it
    with the generation prompt), the conversation up to and including it, and its span in the latter."""

    turn: int  # 0, 1, ... among the assistant messages
    message_index: int
    context: str
    as_last: str
    span: Span
    stable: bool  # the full conversation starts with both renders: history is not rewritten


def render_conversation(conversation: Conversation, template: ChatTemplate, options: RenderOptions,
                        eos_token: str | None) -> RenderResult:
    """The text(s) to tokenize for one conversation, with their trained character spans."""
    if isinstance(conversation, RawConversation):
        return RenderResult((_render_raw(conversation, eos_token),))
    if options.system_message == "fold":
        conversation = fold_system_message(conversation)
    if not (options.sanitize_control_tokens and template.control_tokens):
        return _render_chat(conversation, template, options)
    result = _render_chat(_with_marked_control_tokens(conversation, template.control_tokens), template, options)
    marks = control_token_marks()
    texts = tuple(dataclasses.replace(text, marked=True) if any(m in text.text for m in marks) else text
                  for text in result.texts)
    return dataclasses.replace(result, texts=texts)


def _with_marked_control_tokens(conversation: ChatConversation, tokens: tuple[str, ...]) -> ChatConversation:
    """The conversation with the control tokens in its messages, tools and template kwargs marked as
    transformers marks them (`compat.mark_control_tokens`), to be encoded as text."""
    messages = tuple(dataclasses.replace(
        message, content=mark_control_tokens(message.content, tokens), extra=mark_control_tokens(message.extra, tokens),
        tool_calls=mark_control_tokens(message.tool_calls, tokens)) for message in conversation.messages)
    return dataclasses.replace(conversation, messages=messages,
                               tools=mark_control_tokens(conversation.tools, tokens),
                               template_kwargs=mark_control_tokens(conversation.template_kwargs, tokens))


def fold_system_message(conversation: ChatConversation) -> ChatConversation:
    """A leading system message prepended to the first user message (for templates that have no
    system role, e.g. Gemma's), separated by a blank line."""
    messages = conversation.messages
    if len(messages) < 2 or messages[0].role != "system" or messages[1].role != "user":
        return conversation
    user = dataclasses.replace(messages[1], content=f"{messages[0].content}\n\n{messages[1].content}")
    return dataclasses.replace(conversation, messages=(user, *messages[2:]))


def _render_raw(conversation: RawConversation, eos_token: str | None) -> RenderedText:
    text, spans = "", []
    for piece, trained in conversation.segments:
        if trained:
            spans.append(Span(len(text), len(text) + len(piece), 0, True, len(text) + len(piece)))
        text += piece
    if eos_token and spans:  # the model learns where a completion ends
        last = spans[-1]
        text += eos_token
        spans[-1] = Span(last.start, len(text), 0, True, len(text))
    plain_text = len(conversation.segments) == 1
    return RenderedText(text, tuple(spans), add_special_tokens=True, cut_anywhere=plain_text)


def _is_trained(conversation: ChatConversation, message_index: int, options: RenderOptions) -> bool:
    message = conversation.messages[message_index]
    if message.train is not None:
        return message.train
    if options.loss_on == "last":
        return message_index == conversation.assistant_indices[-1]
    return True


def _render_chat(conversation: ChatConversation, template: ChatTemplate, options: RenderOptions) -> RenderResult:
    template, messages, dropped = as_the_template_sees_it(conversation, template, options)
    ends_with_response = conversation.messages[-1].role == "assistant"
    full = None if ends_with_response else template.render(messages)  # else it is the last Q_k
    turns: list[TurnRender] = []
    for turn_index, message_index in reversed(list(enumerate(conversation.assistant_indices))):
        as_last = template.render(messages[:message_index + 1])
        full = as_last if full is None else full
        context = _history_context(template, messages[:message_index], full)
        as_last = _without_final_eos(template, as_last, full)
        span = _locate_turn(conversation, message_index, turn_index, as_last, _common_prefix(context, as_last),
                            template, options)
        stable = full.startswith(context) and full.startswith(as_last.rstrip())
        turns.insert(0, TurnRender(turn_index, message_index, context, as_last, span, stable))
        message = conversation.messages[message_index]
        words = f"template '{template.name}' drops the words beside a tool call: the call is trained as rendered"
        if message.tool_calls and message.content.strip() and words not in dropped and \
                find_rendered(as_last, message.content, 0)[0] < 0:
            dropped += (words,)  # once per conversation: the account counts conversations

    unshown = _unshown_reasoning(conversation, turns) if any(m.extra for m in conversation.messages) else []
    if unshown:
        if not options.drop_reasoning:
            raise DataError(conversation.source, conversation.where, unshown[0][1],
                            f"chat template '{template.name}' does not show this message's reasoning, so it would be "
                            "dropped", "use a template that renders reasoning (--chat-template FILE.jinja), or set "
                            "data.drop_reasoning: true to train without it", code="template_cannot_render")
        result = _render_chat(_without_reasoning(conversation, {index for index, _ in unshown}), template, options)
        note = f"reasoning dropped (data.drop_reasoning): template '{template.name}' does not show it"
        return dataclasses.replace(result, notes=result.notes + (note,))
    notes = _template_notes(template) + dropped
    if all(turn.stable for turn in turns):
        full, spans = _end_at_stop_tokens(full, [turn.span for turn in turns], template, messages, options)
        return RenderResult((RenderedText(full, spans, train_all=options.loss_on == "all"),), notes=notes)
    if options.unstable_history == "error":
        bad = next(turn.message_index for turn in turns if not turn.stable)
        raise TemplateError(
            f"{conversation.source}, {conversation.where}: chat template '{template.name}' renders earlier turns "
            f"differently once later turns exist (message {bad}), so the context trained on is not what the model "
            "sees at inference. Fix: set unstable_history: tree (one pass, exact contexts) or split.")
    if options.unstable_history in ("split", "tree"):  # each turn with its inference-time context
        texts = tuple(RenderedText(turn.as_last, (turn.span,), train_all=options.loss_on == "all")
                      for turn in turns if turn.span.trained or options.loss_on == "all")
        tree = options.unstable_history == "tree"
        return RenderResult(texts, unstable=True, split=not tree, tree=tree, notes=notes)
    return RenderResult((_relocate_in_full(conversation, full, turns, template, options),), unstable=True,
                        notes=notes)


def as_the_template_sees_it(conversation: ChatConversation, template: ChatTemplate,
                            options: RenderOptions = RenderOptions()
                            ) -> tuple[ChatTemplate, list[dict[str, Any]], tuple[str, ...]]:
    """The template with the conversation's tools and template kwargs, and its messages as
    `apply_chat_template` hands them over (`compat.template_messages`). Tools or reasoning the template
    cannot show are an error, unless the options drop them: the model would otherwise be trained on
    a context other than the one it is given at inference, silently."""
    template = template.for_conversation(conversation.tools, conversation.template_kwargs)
    messages = [message.to_template() for message in conversation.messages]
    dropped: tuple[str, ...] = ()
    if conversation.tools and not template.renders_tools:
        if not options.drop_tools:
            raise DataError(conversation.source, conversation.where, "tools",
                            f"chat template '{template.name}' renders no tool schemas, so the model would learn to "
                            "call functions it is never shown",
                            "use a template that renders tools (--chat-template FILE.jinja), or set "
                            "data.drop_tools: true to train without the schemas", code="template_cannot_render")
        template = template.for_conversation(None, conversation.template_kwargs)
        dropped += (f"tool schemas dropped (data.drop_tools): template '{template.name}' renders none",)
    if any(message.extra for message in conversation.messages):  # else there is nothing to normalise
        messages = template_messages(messages)
    return template, messages, dropped


def tools_block(conversation: ChatConversation, template: ChatTemplate,
                options: RenderOptions = RenderOptions()) -> tuple[str, int, int] | None:
    """The conversation's render and the characters [start, end) in it that its tool schemas add (what
    differs from the render without them), for `inspect` to fold; None without tools shown."""
    if not conversation.tools:
        return None
    own, messages, dropped = as_the_template_sees_it(conversation, template, options)
    if dropped or own.tools is None:
        return None
    with_tools = own.render(messages)
    without = own.for_conversation(None, conversation.template_kwargs).render(messages)
    start = _common_prefix(with_tools, without)
    end = len(with_tools) - _common_prefix(with_tools[start:][::-1], without[start:][::-1])
    return (with_tools, start, end) if end > start else None


def _unshown_reasoning(conversation: ChatConversation, turns: list[TurnRender]) -> list[tuple[int, str]]:
    """The assistant messages whose reasoning their own turn's render (the turn as the last message, what
    the model writes at inference) does not show: (index, field) each, e.g. (3, `messages[3].thinking`)."""
    unshown = []
    for turn in turns:
        message = conversation.messages[turn.message_index]
        key = next((k for k in REASONING_KEYS if isinstance(message.extra.get(k), str)), None)
        if key is not None and message.extra[key].strip() and find_rendered(turn.as_last, message.extra[key],
                                                                              0)[0] < 0:
            unshown.append((turn.message_index, f"messages[{turn.message_index}].{key}"))
    return unshown


def _without_reasoning(conversation: ChatConversation, indices: set[int]) -> ChatConversation:
    """The conversation without the reasoning of the messages at `indices` (what the template cannot show);
    the rest keep theirs."""
    return dataclasses.replace(conversation, messages=tuple(
        dataclasses.replace(m, extra={k: v for k, v in m.extra.items() if k not in REASONING_KEYS})
        if i in indices else m for i, m in enumerate(conversation.messages)))


def has_generation_marks(template: ChatTemplate) -> bool:
    return re.search(GENERATION_TAG, template.source) is not None


def generation_marks_agree(conversation: ChatConversation, template: ChatTemplate, options: RenderOptions,
                           rendered: RenderedText) -> bool | None:
    """Whether onepass's trained spans are what the template's own `{% generation %}` blocks mark
    (transformers' assistant mask), the data-side twin of the model check; None where the two do not
    ask the same question (loss_on other than assistant, per-message train flags, a template that fails
    to mark). A span agrees when it is the marked text, or the marked text less template text before it
    (a header the generation prompt already gives the model)."""
    if options.loss_on != "assistant" or any(m.train is not None for m in conversation.messages):
        return None
    if options.system_message == "fold":
        conversation = fold_system_message(conversation)
    own, messages, _ = as_the_template_sees_it(conversation, template, options)
    try:
        text, marked = generation_marks(own.source, own.adapt(messages), list(own.tools) if own.tools else None,
                                        dict(own.variables))
    except Exception:  # noqa: BLE001 - the template cannot mark this record: nothing to compare
        return None
    if not text or not rendered.text.startswith(text.rstrip()):
        return None
    ours, theirs = _covered(text, [(s.start, s.end) for s in rendered.spans if s.trained]), _covered(text, marked)
    if ours == theirs:
        return True
    if ours - theirs:
        return False
    contents = [m.content for m in conversation.messages if m.content.strip()]
    extra = sorted(theirs - ours)  # marked but not trained: only a header right before trained text
    runs, start = [], extra[0]
    for previous, index in zip(extra, extra[1:] + [None]):
        if index is None or text[previous + 1:index].strip():  # a run ends where untrained text comes between
            runs.append((start, previous + 1))
            start = index
    for run_start, run_end in runs:
        piece = text[run_start:run_end]
        if _skip_space(text, run_end) not in ours or any(c in piece or piece in c for c in contents):
            return False
    return True


def _covered(text: str, spans: list[tuple[int, int]]) -> set[int]:
    """The non-space characters of `text` inside the spans."""
    return {i for start, end in spans for i in range(start, min(end, len(text))) if not text[i].isspace()}


def _end_at_stop_tokens(full: str, spans: list[Span], template: ChatTemplate, messages: list[dict[str, Any]],
                        options: RenderOptions) -> tuple[str, tuple[Span, ...]]:
    """For templates that write nothing after a response (GLM: the model stops by emitting the next role
    token, `<|user|>` or `<|observation|>`), the stop token that follows a response is its end of turn:
    trained, so the model learns to stop. After the conversation's final response the template writes
    nothing, so the stop token it writes when a user speaks next is appended."""
    if not template.stop_texts:
        return full, tuple(spans)
    ended = []
    for span in spans:
        if _ends_with_stop(full[:span.boundary], template):  # the template ends the turn itself
            ended.append(span)
            continue
        after = _skip_space(full, span.boundary)
        if span.boundary == len(full) and span is spans[-1] and messages[-1]["role"] == "assistant":
            stop = _stop_after_response(template)
            full, after = (full + stop, len(full)) if stop else (full, after)
        else:
            stop = next((s for s in template.stop_texts if full.startswith(s, after)), None)
        if stop:
            boundary = after + len(stop)
            span = dataclasses.replace(span, end=boundary if options.train_on_eot else span.end, boundary=boundary)
        ended.append(span)
    return full, tuple(ended)


def _ends_with_stop(text: str, template: ChatTemplate) -> bool:
    return any(text.rstrip().endswith(stop) for stop in template.stop_texts)


def _stop_after_response(template: ChatTemplate) -> str:
    """The stop text the template writes right after a response when the user speaks next (a property
    of the template, found once with a probe conversation)."""
    return _stop_after_response_of(template.source, template.variables, template.stop_texts)


@functools.lru_cache(maxsize=64)
def _stop_after_response_of(source: str, variables: tuple[tuple[str, str], ...], stop_texts: tuple[str, ...]) -> str:
    template = ChatTemplate("probe", source, variables, stop_texts)
    probe = [{"role": "user", "content": "onepass probe question"},
             {"role": "assistant", "content": "onepass probe answer"}]
    try:
        continued = template.render(probe + [{"role": "user", "content": "onepass probe again"}])
        ended = template.render(probe).rstrip()
    except TemplateError:
        return ""
    if not continued.startswith(ended):
        return ""
    after = continued[_skip_space(continued, len(ended)):]
    return next((s for s in stop_texts if after.startswith(s)), "")


def _history_context(template: ChatTemplate, messages: list[dict[str, Any]], full: str) -> str:
    """Turn k's context: the messages before it with the generation prompt, less the text the
    generation prompt adds that past turns never show (e.g. `<think>\n`; see `prompt_only_text`)."""
    context = _render_context(template, messages)
    extra = prompt_only_text(template)
    if extra and context.endswith(extra) and not full.startswith(context):
        return context[:-len(extra)]
    return context


def _without_final_eos(template: ChatTemplate, as_last: str, full: str) -> str:
    """Turn k rendered last, less the EOS some templates (Phi-3) append only after a conversation's
    final message: an earlier turn is not rewritten because the conversation did not end there."""
    eos = template.variable("eos_token")
    trimmed = as_last.rstrip()
    if eos and trimmed.endswith(eos) and not full.startswith(trimmed) and full.startswith(trimmed[:-len(eos)].rstrip()):
        return trimmed[:-len(eos)].rstrip()
    return as_last


def prompt_only_text(template: ChatTemplate) -> str:
    """Text at the end of the template's generation prompt that it does not write before a past
    assistant message (DeepSeek-R1's `<think>\n`, Nemotron's `<think></think>`): a property of the
    template, found once by rendering a probe conversation. Empty for most templates."""
    return _prompt_only_text(template.source, template.variables)


@functools.lru_cache(maxsize=64)
def _prompt_only_text(source: str, variables: tuple[tuple[str, str], ...]) -> str:
    template = ChatTemplate("probe", source, variables)
    probe = [{"role": "user", "content": "onepass probe question"}]
    try:
        prompt = template.render(probe, add_generation_prompt=True)
        answered = template.render(probe + [{"role": "assistant", "content": "onepass probe answer"}])
    except TemplateError:
        return ""
    common = _common_prefix(prompt, answered)
    return prompt[common:] if common >= len(template.render(probe)) else ""


def _template_notes(template: ChatTemplate) -> tuple[str, ...]:
    extra = prompt_only_text(template)
    if not extra:
        return ()
    return (f"the generation prompt ends with {extra!r}, which past assistant turns do not show: each turn is "
            "trained as the template renders it in the conversation",)


def _render_context(template: ChatTemplate, messages: list[dict[str, Any]]) -> str:
    if not messages:
        try:
            return template.render([], add_generation_prompt=True)
        except TemplateError:  # templates may index messages[0]; an opening assistant turn has no context
            return ""
    return template.render(messages, add_generation_prompt=True)


def _has_generation_prompt(template: ChatTemplate) -> bool:
    """Whether the template writes anything for add_generation_prompt (some ignore it: then where the
    model's own text starts is not known, and training starts at the message content)."""
    return _generation_prompt_length(template.source, template.variables) > 0


@functools.lru_cache(maxsize=64)
def _generation_prompt_length(source: str, variables: tuple[tuple[str, str], ...]) -> int:
    template = ChatTemplate("probe", source, variables)
    probe = [{"role": "user", "content": "onepass probe question"}]
    try:
        return len(template.render(probe, add_generation_prompt=True)) - len(template.render(probe))
    except TemplateError:
        return 1


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:  # longest common prefix by bisection on C-speed slice compares
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def find_rendered(text: str, needle: str, start: int) -> tuple[int, int]:
    """Where `needle` is rendered in text[start:]: as is, or trimmed as templates often do."""
    if not needle.strip():
        return -1, -1
    for candidate in (needle, needle.strip(), needle.rstrip(), needle.lstrip()):
        position = text.find(candidate, start)
        if position >= 0:
            return position, position + len(candidate)
    return -1, -1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _locate_turn(conversation: ChatConversation, message_index: int, turn_index: int, text: str, start: int,
                 template: ChatTemplate, options: RenderOptions) -> Span:
    """Turn k's trained span in `text`, which renders messages[:k+1] and whose first `start` chars are context."""
    message = conversation.messages[message_index]
    generated_from = _skip_space(text, start)  # all the model writes after the generation prompt
    content_start, content_end = find_rendered(text, message.content, start)
    if content_start < 0:
        if message.content.strip() and not message.tool_calls:
            raise TemplateError(
                f"{conversation.source}, {conversation.where}: chat template '{template.name}' does not render the "
                f"content of message {message_index} (assistant) as written, so its tokens cannot be found. "
                "Fix: use a template that renders message content verbatim (--chat-template chatml), or "
                "correct the template.")
        # tool calls only, or words beside a call the template drops (Llama-3.1): trained as rendered
        content_start = content_end = _skip_space(text, start)
    if _has_generation_prompt(template):  # the model is given the header and writes the rest (`<think>`, ...)
        content_start = min(content_start, generated_from)
    for key in REASONING_KEYS:
        reasoning = message.extra.get(key)
        if isinstance(reasoning, str) and reasoning.strip():
            reasoning_start, _ = find_rendered(text, reasoning, start)
            if 0 <= reasoning_start < content_start:
                content_start = reasoning_start
    turn_end = len(text.rstrip())
    end = turn_end if options.train_on_eot else content_end
    return Span(content_start, end, turn_index, _is_trained(conversation, message_index, options), turn_end)


def _relocate_in_full(conversation: ChatConversation, full: str, turns: list[TurnRender], template: ChatTemplate,
                      options: RenderOptions) -> RenderedText:
    """`warn` policy: find each turn in the full text as rendered there (history rewritten)."""
    spans, cursor = [], 0
    for turn in turns:
        start = max(cursor, _common_prefix(turn.context, full))
        message = conversation.messages[turn.message_index]
        content_start, content_end = find_rendered(full, message.content, start)
        if content_start < 0:
            raise TemplateError(
                f"{conversation.source}, {conversation.where}: chat template '{template.name}' rewrites message "
                f"{turn.message_index} in the full conversation, so it cannot be trained in one pass. "
                "Fix: set unstable_history: split.")
        _, content_end_as_last = find_rendered(turn.as_last, message.content, turn.span.start)
        eot_text = turn.as_last[max(content_end_as_last, turn.span.start):turn.span.boundary].strip()
        eot_start = _skip_space(full, content_end)
        turn_end = eot_start + len(eot_text) if eot_text and full.startswith(eot_text, eot_start) else content_end
        end = turn_end if options.train_on_eot else content_end
        spans.append(Span(content_start, end, turn.turn, turn.span.trained, turn_end))
        cursor = turn_end
    return RenderedText(full, tuple(spans), train_all=options.loss_on == "all")


def tokenize_rendered(tokenizer: Any, rendered: list[RenderedText]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and character offsets for each text, in one batched call of the Rust tokenizer (a text
    with marked control tokens, piece by piece: `_encode_marked`)."""
    backend = tokenizer.backend_tokenizer
    results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(rendered)  # type: ignore[list-item]
    marked = {i for i, item in enumerate(rendered) if item.marked}
    for i in marked:
        results[i] = _encode_marked(tokenizer, rendered[i].text)
    for add_special in (False, True):
        indices = [i for i, item in enumerate(rendered) if item.add_special_tokens == add_special and i not in marked]
        if not indices:
            continue
        encodings = backend.encode_batch([rendered[i].text for i in indices], add_special_tokens=add_special)
        for i, encoding in zip(indices, encodings):
            flat = itertools.chain.from_iterable(encoding.offsets)
            offsets = np.fromiter(flat, dtype=np.int64, count=2 * len(encoding.offsets)).reshape(-1, 2)
            results[i] = (np.fromiter(encoding.ids, dtype=np.int32, count=len(encoding.ids)), offsets)
    return results


def _encode_marked(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids and offsets of a text rendered from marked strings, as transformers' `encode_marked_chat`
    encodes it: split at each marked token and lone marker; the first piece encoded as it is, each later
    one after a newline that is then removed (so SentencePiece adds no space); a marked token spelled as
    plain text, its tokens all at the token's characters (in the message whose text holds it)."""
    markers = control_token_markers(tokenizer)
    backend = tokenizer.backend_tokenizer
    newline = backend.encode("\n", add_special_tokens=False).ids
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []

    def plain(piece: str, at: int, first: bool) -> None:
        if not piece:
            return
        encoding = backend.encode(piece if first else "\n" + piece, add_special_tokens=False)
        shift = 0 if first else -1
        if not first and encoding.ids[:len(newline)] == newline:
            pairs = list(zip(encoding.ids, encoding.offsets))[len(newline):]
        else:
            encoding = backend.encode(piece, add_special_tokens=False) if not first else encoding
            pairs, shift = list(zip(encoding.ids, encoding.offsets)), 0
        ids.extend(token for token, _ in pairs)
        offsets.extend((at + start + shift, at + end + shift) for _, (start, end) in pairs)

    cursor = 0
    for match in markers.finditer(text):
        plain(text[cursor:match.start()], cursor, first=cursor == 0)
        token = match.group(1)
        if token:
            as_text = encode_token_as_text(tokenizer, token)
            if tokenizer.convert_tokens_to_ids(token) in as_text:
                raise OnepassError(f"cannot sanitize {token!r}: the tokenizer makes that token from plain text, so "
                                   "it cannot be encoded as text. Fix: set data.sanitize_control_tokens: false.")
            token_start = match.start(1)
            ids.extend(as_text)
            offsets.extend([(token_start, token_start + len(token))] * len(as_text))
        cursor = match.end()
    plain(text[cursor:], cursor, first=cursor == 0)
    return np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def mask_tokens(rendered: RenderedText, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """loss_mask and turn per token from the character spans: a token is in a span if it overlaps it."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    loss_mask = np.full(len(offsets), 1 if rendered.train_all else 0, dtype=np.int8)
    turn = np.full(len(offsets), -1, dtype=np.int32)
    for span in rendered.spans:
        inside = (starts < span.end) & (ends > span.start)
        turn[inside] = span.turn
        if span.trained:
            loss_mask[inside] = 1
    return loss_mask, turn


def cut_point(rendered: RenderedText, offsets: np.ndarray, max_seq_len: int) -> int:
    """Tokens to keep so the example fits: at a turn boundary (later turns dropped whole), or 0."""
    if rendered.cut_anywhere:
        return max_seq_len
    starts = offsets[:, 0]
    best = 0
    for span in rendered.spans:
        keep = int(np.searchsorted(starts, span.boundary, side="left"))
        if keep <= max_seq_len:
            best = max(best, keep)
    return best
