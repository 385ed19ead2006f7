"""Every real chat template TRL ships (its `chat_templates` folder: the original beside a
`{% generation %}`-tagged training variant): onepass's masks on the original, with default options,
against the assistant masks transformers computes from the training variant.

A turn agrees when onepass trains the same text, or the same text less template text just before
it that the training variant also trains (the role header or `<think>` the generation prompt
already gives the model). A template that truly rewrites history gives one tree per conversation
whose paths are the inference-time renders (the training variants instead train every turn as
history renders it); a record a template refuses must be an error naming the record."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from onepass.compat import template_messages
from onepass.data.chat_template import ChatTemplate
from onepass.data.formats import to_conversation
from onepass.data.prepare import render_all
from onepass.data.types import Record, RenderOptions
from onepass.errors import DataError

from conftest import tree_paths

trl = pytest.importorskip("trl")  # installed with onepass[test]
CORPUS = Path(trl.__file__).parent / "chat_templates"
FAMILIES = sorted(p.stem for p in CORPUS.glob("*.jinja") if (CORPUS / f"{p.stem}_training.jinja").exists())

# Templates that render a past assistant turn differently from the turn as generated: one tree each.
REWRITES_HISTORY = {"qwen3", "qwen3_5_nothink", "qwen3_5_think", "qwen3_6", "gptoss"}
KNOWN_GAPS = {  # (family, conversation): what onepass does not do yet
    ("diffusion_gemma", "tool"): "the tool-response header after a call is trained as the call's end of turn",
    ("diffusion_gemma", "agentic"): "the tool-response header after a call is trained as the call's end of turn",
}
# The stop tokens of a family's generation_config.json (eos_token_id), where the template writes no
# end-of-turn text of its own: GLM-4.5 stops at the next role token.
GENERATION_STOPS = {"glm4moe": ("<|endoftext|>", "<|user|>", "<|observation|>")}

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello, Ada."},
              {"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Your name is Ada."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": "Hello, Ada."}, {"role": "user", "content": "What is my name?"},
               {"role": "assistant", "content": "Your name is Ada."}],
    "tool": [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "name": "get_weather", "content": "sunny"},
             {"role": "assistant", "content": "It is sunny."}],
    # tool schemas, reasoning, parallel calls with a tool_call_id each, and a final answer
    "agentic": [{"role": "system", "content": "You are a travel assistant."},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": "", "reasoning_content": "Two cities, two calls.", "tool_calls": [
                    {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "c0", "name": "get_weather", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "snow"},
                {"role": "assistant", "content": "Paris is sunny; Oslo has snow.", "reasoning_content": "Both in."}],
}
TOOLS = {"agentic": [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}
# The agentic conversation's tools and reasoning where the template shows them, dropped where it shows none
# (onepass's error then, without data.drop_tools / drop_reasoning: tests/data/test_template_oracle.py)
OPTIONS = RenderOptions(drop_tools=True, drop_reasoning=True)


def variables(tokenizer) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))


def trained_runs(tokenizer, ids, mask) -> list[str]:
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run).strip() for run in runs + ([current] if current else [])]


def training_variant_runs(tokenizer, family: str, messages: list[dict], tools: list[dict] | None = None) -> list[str]:
    """What transformers marks as assistant tokens with the training variant (given messages in the
    shape that template renders, as onepass would give them)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (CORPUS / f"{family}_training.jinja").read_text()
    messages = ChatTemplate(f"{family}_training", source, variables(tokenizer)).adapt(messages)
    rendered, generation = render_jinja_template(conversations=[messages], chat_template=source, tools=tools,
                                                 return_assistant_tokens_mask=True, **dict(variables(tokenizer)))
    encoding = tokenizer.backend_tokenizer.encode(rendered[0], add_special_tokens=False)
    mask = [any(s < span_end and e > span_start for span_start, span_end in generation[0])
            for s, e in encoding.offsets]
    return trained_runs(tokenizer, encoding.ids, mask)


def original(tokenizer, family: str) -> ChatTemplate:
    return ChatTemplate(family, (CORPUS / f"{family}.jinja").read_text(), variables(tokenizer),
                        GENERATION_STOPS.get(family, ()))


def onepass_example(tokenizer, family: str, messages: list[dict], tools: list[dict] | None = None):
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    conversation = to_conversation(Record("d.jsonl", "line 1", record), "messages")
    [example], _ = render_all([conversation], tokenizer, original(tokenizer, family), OPTIONS)
    return example


def agrees(ours: str, theirs: str, messages: list[dict]) -> bool:
    if ours == theirs:
        return True
    extra = theirs[:-len(ours)] if ours and theirs.endswith(ours) else None
    contents = [m["content"] for m in messages if m["content"]]
    return extra is not None and not any(content in extra for content in contents)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_real_template_masks_match_its_training_variant_or_history_rewriting_gives_one_tree(tokenizer, family, conversation):
    if (family, conversation) in KNOWN_GAPS:
        pytest.xfail(KNOWN_GAPS[family, conversation])
    messages, tools = CONVERSATIONS[conversation], TOOLS.get(conversation)
    try:
        expected = training_variant_runs(tokenizer, family, messages, tools)
    except Exception as refusal:  # the template refuses this conversation (roles it does not support)
        with pytest.raises(DataError, match=f"chat template '{family}' failed to render") as error:
            onepass_example(tokenizer, family, messages, tools)
        assert error.value.code == "template_refused" and "line 1" in str(error.value), refusal
        return
    example = onepass_example(tokenizer, family, messages, tools)
    if example.is_tree:  # history rewritten: each turn's path is its inference-time render
        assert family in REWRITES_HISTORY, f"{family} is not known to rewrite history"
        template = original(tokenizer, family).for_conversation(tuple(tools) if tools else None)
        messages = template_messages(messages)  # as apply_chat_template hands them over (reasoning aliased)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        paths = tree_paths(example)
        assert len(paths) == len(turns)
        for turn, (path, index) in enumerate(zip(paths, turns)):
            rendered = tokenizer.decode(example.input_ids[path].tolist())
            assert rendered.rstrip() == template.render(messages[:index + 1]).rstrip()
            trained = [n for n in path if example.loss_mask[n] and example.turn[n] == turn]
            assert messages[index]["content"] in tokenizer.decode(example.input_ids[trained].tolist())
        return
    got = trained_runs(tokenizer, example.input_ids.tolist(), example.loss_mask.tolist())
    assert len(got) == len(expected), (got, expected)
    for ours, theirs in zip(got, expected):
        assert agrees(ours, theirs, messages), (got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_reports_its_masks_agree_with_the_generation_marks_of_a_training_variant(tokenizer, tmp_path,
                                                                                         family):
    """The data-side twin of the model check: where the template marks what to train, prepare compares."""
    from onepass.data.prepare import prepare
    from onepass.data.report import summary_line

    from conftest import write_jsonl

    records = [{"messages": CONVERSATIONS[name], **({"tools": TOOLS[name]} if name in TOOLS else {})}
               for name in ("plain", "system", "agentic") if (family, name) not in KNOWN_GAPS]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    template = dataclasses.replace(original(tokenizer, family), name=f"{family}_training",
                                   source=(CORPUS / f"{family}_training.jinja").read_text())
    data = prepare([path], tokenizer, template, OPTIONS, use_cache=False, on_bad_record="skip")
    compared = sum(data.stats.generation_marks.values())
    assert data.stats.generation_marks["differ"] == 0, data.stats.generation_marks
    assert compared == data.stats.examples - data.stats.trees - data.stats.split
    if compared:
        assert f"masks agree with the template's generation marks: {compared}/{compared}" in summary_line("d",
                                                                                                          data.stats)


def test_masks_that_differ_from_the_generation_marks_are_counted(tokenizer, tmp_path):
    from onepass.data.prepare import prepare

    from conftest import write_jsonl

    marks_the_user = ("{% for m in messages %}{% if m['role'] == 'user' %}{% generation %}<|im_start|>user\n"
                      "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n"
                      "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS["plain"]}] * 3)
    data = prepare([path], tokenizer, ChatTemplate("marks", marks_the_user, variables(tokenizer)), RenderOptions(),
                   use_cache=False)
    assert data.stats.generation_marks == {"differ": 3}
