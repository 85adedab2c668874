"""The T5 encoder loads from a local folder (tokenizer + weights) and ignores padding."""

import pytest
import torch

from sparvar import load_pipeline
from sparvar.models.infinity.text import TextEncoder
from sparvar.models.registry import MODELS

WORDS = "a red fox in the snow cat dog on grass".split()


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny T5 encoder with a real (tiny) sentencepiece-style tokenizer, saved like a hub folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0 - i) for i, w in enumerate(WORDS)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    folder = tmp_path_factory.mktemp("flan-t5-tiny")
    T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(folder)
    config = dict(MODELS["infinity-tiny"].text, vocab_size=len(vocab))
    torch.manual_seed(0)
    T5EncoderModel(T5Config(**config)).save_pretrained(folder)
    return folder


def test_features_of_a_prompt_do_not_depend_on_padding(t5_folder):
    encoder = TextEncoder.from_folder(t5_folder, "cpu", torch.float32)
    alone, alone_mask = encoder(["cat"])
    batch, mask = encoder(["a red fox in the snow", "cat"])
    assert mask.tolist() == [[True] * 7, [True, True] + [False] * 5]  # words + </s>, then padding
    assert alone_mask.tolist() == [[True, True]]
    assert torch.allclose(batch[1, :2], alone[0], atol=1e-5)


@pytest.mark.slow
def test_pipeline_uses_the_folder_encoder(t5_folder):
    pipe = load_pipeline("infinity-tiny", text_encoder=str(t5_folder), device="cpu")
    assert pipe.text_encoder.model.config.vocab_size == len(WORDS) + 3
    out = pipe(["a dog on grass"], schedule=pipe.schedule("1:1", 256), progress=False)
    assert out.images[0].size == (16 * 2, 16 * 2)


def test_the_4d_mask_forward_of_graphs_equals_the_plain_one(t5_folder):
    """The graphed encoder builds its own additive 4D mask (transformers' mask code syncs with
    the host); on the real tokens it gives the plain forward's features."""
    encoder = TextEncoder.from_folder(t5_folder, "cpu", torch.float32)
    ids, mask = encoder.tokenizer(["a red fox in the snow", "cat"], 512)
    ids, mask = torch.nn.functional.pad(ids, (0, 5)), torch.nn.functional.pad(mask, (0, 5))  # graph padding
    plain = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    four_d = encoder._forward_4d(ids, mask)
    assert torch.allclose(four_d[mask], plain[mask], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_encoder_matches_eager_cuda():
    encoder = TextEncoder.random(MODELS["infinity-tiny"].text, "cuda", torch.bfloat16, seed=0)
    for prompts in (["a red fox in the snow", "cat"], ["dog on grass", "a cat in the snow at dawn"]):
        eager, eager_mask = encoder(prompts)
        graphed, mask = encoder(prompts, cuda_graph=True)  # first: capture and replay; second prompts: replay
        assert mask.shape[1] % 64 == 0 and torch.equal(mask[:, : eager_mask.shape[1]], eager_mask)
        assert not mask[:, eager_mask.shape[1]:].any()
        assert torch.allclose(graphed[:, : eager.shape[1]][eager_mask], eager[eager_mask], atol=2e-2, rtol=2e-2)
    assert len(encoder._graphs) == 1 and None not in encoder._graphs.values()
