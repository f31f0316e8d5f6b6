"""The small components every built-in pipeline shares: an in-memory byte-level BPE
vocabulary and CLIP tokenizers, small CLIP text configs, a 3-block KL autoencoder and SDXL's
Euler scheduler. The tiny built-ins (``tiny_sdxl``, ``tiny_sd3``) and the training of the
digit models (``hybridiff.zoo.train``) build their pipelines from these, so nothing is ever
downloaded; only each model's denoiser differs, and it comes from a JSON config
(``arch.denoiser_from_config``)."""

from __future__ import annotations

import collections

from diffusers import AutoencoderKL, EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTokenizer

LATENT_CHANNELS = 4
LATENT_SIZE = 32
VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)  # 3 blocks -> vae_scale_factor 4 -> 128 x 128 images
IMAGE_SIZE = LATENT_SIZE * 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
MODEL_MAX_LENGTH = 32

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

_COMMON_WORDS = """
a an the of and in on at with by for to from is are was be it this that as or but not no all some
one two three four five many more most very into over under above below near behind front back top
bottom left right side inside outside up down out off through across around between
red green blue yellow black white orange purple pink brown gray grey gold golden silver colorful
dark light bright pale shiny transparent
cube sphere cone cylinder pyramid box ball block shape table chair desk bed sofa lamp window door
wall floor roof room kitchen house building tower bridge castle church city town village street
road car bus truck train boat ship plane bicycle
cat dog bird horse cow fish lion tiger bear elephant rabbit fox wolf duck owl monkey animal
man woman person people boy girl child baby face hand hair eyes head body
tree trees flower flowers grass leaf leaves forest garden park field farm mountain mountains hill
river lake sea ocean beach island desert snow rain cloud clouds sky sun moon star stars water fire
ice rock stone sand
photo photograph picture painting drawing sketch portrait landscape art style illustration render
image scene view close shot detailed realistic cinematic lighting background
small large big tiny huge tall short long wide old new young beautiful pretty ugly happy sad cute
wooden metal glass plastic paper soft hard hot cold warm wet dry empty full clean dirty
sitting standing running walking flying swimming eating drinking holding playing looking wearing
sleeping reading riding jumping
day night morning evening sunset sunrise summer winter spring autumn
apple banana cake bread pizza coffee cup bowl plate bottle book phone computer clock hat shirt dress
shoes bag umbrella guitar piano
""".split()


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2/CLIP) uses for the 256 bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _train_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is a single token.

    Plain BPE training with ties broken lexicographically, so the result is deterministic (the
    `tokenizers` trainer breaks ties in hash order, which differs between processes). Replaying
    the merges in order turns each training word back into one ``word</w>`` token.
    """
    sequences = [[*word[:-1], word[-1] + END_OF_WORD] for word in words if len(word) > 1]
    merges: list[tuple[str, str]] = []
    while sequences:
        counts = collections.Counter(pair for seq in sequences for pair in zip(seq, seq[1:]))
        left, right = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append((left, right))
        merged_sequences = []
        for seq in sequences:
            merged: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == left and seq[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            if len(merged) > 1:
                merged_sequences.append(merged)
        sequences = merged_sequences
    return merges


def build_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte alphabet (plain and end-of-word), learned word pieces, then BOS/EOS last (as in CLIP)."""
    alphabet = _byte_alphabet()
    merges = _train_bpe_merges(sorted(set(_COMMON_WORDS)))
    tokens = [*alphabet, *(char + END_OF_WORD for char in alphabet)]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str
) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # the `tokenizers` BPE model needs (left, right) tuples, not "left right"
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def text_config(
    tokenizer: CLIPTokenizer,
    hidden_size: int,
    num_heads: int,
    hidden_act: str,
    projection_dim: int = 32,
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2], so at least two layers
        num_attention_heads=num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_vae(latent_channels: int = LATENT_CHANNELS, scaling_factor: float = 0.13025, **extra: object) -> AutoencoderKL:
    """A 3-block KL autoencoder (128 x 128 images); defaults are SDXL's latent space."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        **extra,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """Euler with SDXL's noise schedule and timestep spacing."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
