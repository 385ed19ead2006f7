"""Rendering with real-style chat templates: exactly the responses (and their end-of-turn text) are trained."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onepass.data.chat_template import ChatTemplate, load_chat_template
from onepass.data.prepare import render_all
from onepass.errors import OnepassError, TemplateError
from onepass.data.formats import detect_format, to_conversation
from onepass.data.types import Record
from onepass.data.types import RenderOptions

from conftest import chat, tree_paths

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}
TWO_TURNS = chat("My name is Ada. Remember it.", "Hello, Ada.", "What is my name?", "Your name is Ada.")


def conversation(data: dict):
    return to_conversation(Record("data.jsonl", "line 1", data), detect_format(data))


def render(tokenizer, data, template="chatml", **options):
    examples, stats = render_all([conversation(data)], tokenizer, load_chat_template(tokenizer, template),
                                 RenderOptions(**options))
    return examples, stats


def trained_text_per_turn(tokenizer, example) -> dict[int, str]:
    turns = sorted(set(example.turn[example.loss_mask == 1].tolist()))
    return {k: tokenizer.decode(example.input_ids[(example.loss_mask == 1) & (example.turn == k)].tolist())
            for k in turns}


@pytest.mark.parametrize("template", sorted(EOT))
def test_trained_tokens_decode_to_exactly_the_responses_plus_end_of_turn(tokenizer, template):
    [example], _ = render(tokenizer, TWO_TURNS, template)
    trained = trained_text_per_turn(tokenizer, example)
    assert {k: text.strip() for k, text in trained.items()} == {0: "Hello, Ada." + EOT[template],
                                                                1: "Your name is Ada." + EOT[template]}


@pytest.mark.parametrize("template", sorted(EOT))
def test_role_headers_and_whitespace_between_messages_are_not_trained(tokenizer, template):
    [example], _ = render(tokenizer, TWO_TURNS, template)
    untrained = tokenizer.decode(example.input_ids[example.loss_mask == 0].tolist())
    assert "Ada." not in untrained.replace("My name is Ada.", "")
    assert "user" in untrained or "[INST]" in untrained


def test_train_on_eot_false_trains_the_content_alone(tokenizer):
    [example], _ = render(tokenizer, TWO_TURNS, "llama3", train_on_eot=False)
    assert trained_text_per_turn(tokenizer, example) == {0: "Hello, Ada.", 1: "Your name is Ada."}


def test_loss_on_last_trains_only_the_final_response(tokenizer):
    [example], _ = render(tokenizer, TWO_TURNS, loss_on="last")
    assert trained_text_per_turn(tokenizer, example) == {1: "Your name is Ada.<|im_end|>"}
    assert set(example.turn.tolist()) == {-1, 0, 1}  # turn still says which response a token belongs to


def test_loss_on_all_trains_the_whole_sequence(tokenizer):
    [example], _ = render(tokenizer, TWO_TURNS, loss_on="all")
    assert example.loss_mask.all()


def test_per_message_train_flag_overrides_the_policy(tokenizer):
    data = chat("q1", "a1", "q2", "a2")
    data["messages"][1]["train"] = True
    data["messages"][3]["train"] = False
    [example], _ = render(tokenizer, data, loss_on="last")
    assert trained_text_per_turn(tokenizer, example) == {0: "a1<|im_end|>"}


def test_a_conversation_with_no_trained_turn_is_dropped_and_counted(tokenizer):
    data = chat("q1", "a1")
    data["messages"][1]["train"] = False
    examples, stats = render(tokenizer, data)
    assert examples == [] and stats.dropped == {"no trained tokens": 1}


def test_template_that_appends_a_final_eos_trains_it(tokenizer):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% else %}{{ eos_token }}{% endif %}")
    examples, _ = render_all([conversation(chat("q", "a"))], tokenizer,
                             ChatTemplate("eos-at-end", template, (("eos_token", "</s>"),)), RenderOptions())
    assert trained_text_per_turn(tokenizer, examples[0])[0].strip() == "a\n</s>"


def test_template_that_rewrites_content_is_an_error_naming_template_and_message(tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="chat template 'shouting' does not render the content of message 1"):
        render_all([conversation(chat("q", "a"))], tokenizer, ChatTemplate("shouting", template, ()),
                   RenderOptions())


def test_reasoning_content_is_trained_with_the_answer(tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}</think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    data = chat("q", "a")
    data["messages"][1]["reasoning_content"] = "because"
    examples, _ = render_all([conversation(data)], tokenizer, ChatTemplate("think", template, ()), RenderOptions())
    # the generation prompt ends at "assistant\n": the model writes "<think>" itself, so it is trained too
    assert trained_text_per_turn(tokenizer, examples[0]) == {0: "<think>because</think>a<|im_end|>"}


REASONING_TWO_TURNS = chat("q1", "<think>r1</think>a1", "q2", "<think>r2</think>a2")


def test_history_rewriting_template_is_detected_and_an_error_when_asked(tokenizer):
    with pytest.raises(TemplateError, match="chat template 'qwen3' renders earlier turns differently.*message 1"):
        render(tokenizer, REASONING_TWO_TURNS, "qwen3", unstable_history="error")


def test_by_default_a_history_rewriting_conversation_is_one_tree_whose_paths_are_the_inference_renders(tokenizer):
    template = load_chat_template(tokenizer, "qwen3")
    [example], stats = render(tokenizer, REASONING_TWO_TURNS, "qwen3")
    assert (stats.unstable, stats.trees, stats.split) == (1, 1, 0) and example.is_tree
    messages = REASONING_TWO_TURNS["messages"]
    paths = tree_paths(example)
    assert len(paths) == 2
    for turn, path in enumerate(paths):
        inference_render = template.render(messages[:2 * turn + 2]).rstrip()
        assert tokenizer.decode(example.input_ids[path].tolist()).rstrip() == inference_render
    split, _ = render(tokenizer, REASONING_TWO_TURNS, "qwen3", unstable_history="split")
    for turn, single in enumerate(split):  # trained tokens per turn equal split's
        on_path = example.input_ids[[n for n in paths[turn] if example.loss_mask[n] and example.turn[n] == turn]]
        np.testing.assert_array_equal(on_path, single.input_ids[single.loss_mask == 1])
    assert len(example) < sum(len(e) for e in split)  # the shared context is computed once


def test_qwen3_style_empty_reasoning_on_the_last_turn_counts_as_rewriting(tokenizer):
    _, stats = render(tokenizer, chat("q1", "a1", "q2", "a2"), "qwen3", unstable_history="warn")
    assert stats.unstable == 1


def test_split_gives_each_turn_its_inference_time_context(tokenizer):
    template = load_chat_template(tokenizer, "qwen3")
    examples, stats = render(tokenizer, REASONING_TWO_TURNS, "qwen3", unstable_history="split")
    assert (stats.unstable, stats.split, len(examples)) == (1, 1, 2)
    messages = REASONING_TWO_TURNS["messages"]
    for turn, example in enumerate(examples):
        context = template.render(messages[:2 * turn + 1], add_generation_prompt=True)
        first_trained = int(np.argmax(example.loss_mask))
        assert tokenizer.decode(example.input_ids[:first_trained].tolist()).startswith(context.rstrip("\n"))
        assert list(trained_text_per_turn(tokenizer, example)) == [turn]
    assert "r1" in trained_text_per_turn(tokenizer, examples[0])[0]  # reasoning kept where it is generated
    assert "r1" not in tokenizer.decode(examples[1].input_ids.tolist())  # and stripped from later context


def test_warn_trains_the_full_rendering_and_counts_it(tokenizer):
    [example], stats = render(tokenizer, chat("q1", "a1", "q2", "a2"), "qwen3", unstable_history="warn")
    assert stats.unstable == 1 and stats.split == 0
    assert {k: v.strip() for k, v in trained_text_per_turn(tokenizer, example).items()} == {
        0: "a1<|im_end|>", 1: "a2<|im_end|>"}


def test_truncate_cuts_at_turn_boundaries_never_inside_a_response(tokenizer):
    [full], _ = render(tokenizer, TWO_TURNS)
    first_turn_end = int(np.flatnonzero(full.turn == 0)[-1]) + 1
    [cut], stats = render(tokenizer, TWO_TURNS, max_seq_len=len(full) - 3, overlong="truncate")
    assert stats.truncated == 1
    assert first_turn_end <= len(cut) < len(full)
    assert trained_text_per_turn(tokenizer, cut) == {0: "Hello, Ada.<|im_end|>"}
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:len(cut)])


def test_truncation_that_leaves_no_trained_tokens_drops_and_counts(tokenizer):
    examples, stats = render(tokenizer, TWO_TURNS, max_seq_len=5, overlong="truncate")
    assert examples == [] and stats.dropped == {"no trained tokens after truncation": 1}
    examples, stats = render(tokenizer, TWO_TURNS, loss_on="last", max_seq_len=40, overlong="truncate")
    assert examples == [] and stats.dropped == {"no trained tokens after truncation": 1}


def test_overlong_drop_and_error(tokenizer):
    examples, stats = render(tokenizer, TWO_TURNS, max_seq_len=10, overlong="drop")
    assert examples == [] and stats.dropped == {"longer than max_seq_len": 1}
    with pytest.raises(OnepassError, match=r"data.jsonl, line 1: \d+ tokens, more than max_seq_len=10"):
        render(tokenizer, TWO_TURNS, max_seq_len=10, overlong="error")


def test_raw_prompt_completion_trains_completion_and_eos(tokenizer):
    [example], _ = render(tokenizer, {"prompt": "2+2=", "completion": "4"})
    assert trained_text_per_turn(tokenizer, example) == {0: "4</s>"}


WORDS = st.text(alphabet="abcdefghij XYZ.,!?0123", min_size=1, max_size=30).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(WORDS)})
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(WORDS)})
        messages.append({"role": "assistant", "content": draw(WORDS)})
        if draw(st.booleans()):
            messages.append({"role": "tool", "content": draw(WORDS)})
            messages.append({"role": "assistant", "content": draw(WORDS)})
    return {"messages": messages}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=conversations())
def test_no_user_system_or_tool_token_is_ever_trained_and_every_response_token_is(tokenizer, data):
    [example], _ = render(tokenizer, data, "chatml")
    text = ""
    owner = []  # which message each character of the rendering belongs to
    for index, message in enumerate(data["messages"]):
        header = f"<|im_start|>{message['role']}\n"
        text += header
        owner += [-1] * len(header)
        text += message["content"]
        owner += [index] * len(message["content"])
        text += "<|im_end|>\n"
        owner += [-1] * len("<|im_end|>\n")
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    assert encoding.ids == example.input_ids.tolist()
    for (start, end), trained in zip(encoding.offsets, example.loss_mask.tolist()):
        roles = {data["messages"][owner[c]]["role"] for c in range(start, end) if owner[c] >= 0}
        if roles - {"assistant"}:
            assert not trained, f"token {text[start:end]!r} of a {roles} message is trained"
        if "assistant" in roles:
            assert trained, f"assistant token {text[start:end]!r} is not trained"


R1_STYLE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_a_generation_prompt_with_text_past_turns_lack_is_reported_once_and_trained_as_rendered(tokenizer):
    template = ChatTemplate("r1-style", R1_STYLE, ())
    conversations = [conversation(TWO_TURNS), conversation(chat("q", "a"))]
    examples, stats = render_all(conversations, tokenizer, template, RenderOptions())
    assert len(examples) == 2 and stats.unstable == 0
    [(note, count)] = stats.template_notes.items()
    assert count == 2 and "'<think>\\n'" in note
    assert {k: t.strip() for k, t in trained_text_per_turn(tokenizer, examples[0]).items()} == {
        0: "Hello, Ada.<|im_end|>", 1: "Your name is Ada.<|im_end|>"}


PHI3_STYLE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")


def test_a_conversation_final_eos_is_not_history_rewriting_and_is_trained_after_the_last_response(tokenizer):
    template = ChatTemplate("phi3-style", PHI3_STYLE, (("eos_token", "</s>"),))
    [example], stats = render_all([conversation(TWO_TURNS)], tokenizer, template, RenderOptions())
    assert stats.unstable == 0
    assert {k: t.strip() for k, t in trained_text_per_turn(tokenizer, example).items()} == {
        0: "Hello, Ada.<|end|>", 1: "Your name is Ada.<|end|>\n</s>"}


def test_a_template_without_a_system_role_says_how_to_fold_it_and_folding_trains_the_same_responses(tokenizer):
    data = chat("My name is Ada.", "Hello, Ada.", system="Be brief.")
    with pytest.raises(OnepassError, match="System role not supported.*system_message: fold"):
        render(tokenizer, data, "gemma")
    [example], _ = render(tokenizer, data, "gemma", system_message="fold")
    text = tokenizer.decode(example.input_ids.tolist())
    assert "<start_of_turn>user\nBe brief.\n\nMy name is Ada." in text
    assert trained_text_per_turn(tokenizer, example) == {0: "Hello, Ada.<end_of_turn>"}


GLM_STYLE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_where_a_template_writes_no_end_of_turn_the_next_stop_token_is_trained_final_turn_included(
        tokenizer, tmp_path):
    import json as json_module
    import shutil

    from onepass.data.chat_template import stop_texts
    from onepass.data.tokenizer import load_tokenizer

    shutil.copytree(tokenizer.name_or_path, tmp_path / "tok")
    stop_id = tokenizer.convert_tokens_to_ids("<|im_start|>")  # stands in for GLM's <|user|>
    (tmp_path / "tok" / "generation_config.json").write_text(json_module.dumps({"eos_token_id": [1, stop_id]}))
    assert stop_texts(load_tokenizer(tmp_path / "tok")) == ("</s>", "<|im_start|>")
    template = ChatTemplate("glm-style", GLM_STYLE.replace("<|{{ m['role'] }}|>", "<|im_start|>{{ m['role'] }}")
                            .replace("<|assistant|>", "<|im_start|>assistant"), (), ("</s>", "<|im_start|>"))
    [example], _ = render_all([conversation(TWO_TURNS)], tokenizer, template, RenderOptions())
    assert {k: t.strip() for k, t in trained_text_per_turn(tokenizer, example).items()} == {
        0: "Hello, Ada.<|im_start|>", 1: "Your name is Ada.<|im_start|>"}


def test_a_malformed_generation_config_is_one_error_naming_the_file_and_the_field(tmp_path):
    from onepass.data.chat_template import generation_stop_ids
    from onepass.errors import OnepassError

    config = tmp_path / "generation_config.json"
    config.write_text('{"eos_token_id": [15, 22, null]}')
    with pytest.raises(OnepassError, match=r"generation_config.json, field 'eos_token_id': \[15, 22, null\]"):
        generation_stop_ids(config)
    config.write_text('{"eos_token_id": [15, ')
    with pytest.raises(OnepassError, match="generation_config.json: not a readable JSON object"):
        generation_stop_ids(config)
    config.write_text('{"eos_token_id": 7}')
    assert generation_stop_ids(config) == [7]
    assert generation_stop_ids(tmp_path / "absent.json") == []
