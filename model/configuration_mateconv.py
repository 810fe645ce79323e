"""MateConv configuration: a transformers ``PretrainedConfig`` (dense LLaMA-style or DeepSeek-style MoE).

Field names follow transformers (``hidden_size``, ``num_hidden_layers`` ...) so that the whole
Hugging Face ecosystem reads them; the MoE fields follow DeepSeek's names where one exists.
"""

from __future__ import annotations

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class MateConvConfig(_BaseConfig):
    """Configuration of a MateConv causal LM.

    Defaults are the original ``MateConv-0.02B`` (dim 512, 8 layers, 16 heads, 8 KV heads, SwiGLU 1408,
    vocab 6400, tied embeddings). ``use_moe=True`` alone gives the original MoE layout:
    4 routed experts, top-2, 1 shared expert of the same width, softmax router, renormalised top-k.

    MoE fields:
        use_moe: replace the MLP of every layer from ``first_k_dense_replace`` on with an MoE layer.
        n_routed_experts / num_experts_per_tok / n_shared_experts: routed experts, top-k, always-on experts.
        moe_intermediate_size: hidden width of one expert (default: ``intermediate_size``).
        first_k_dense_replace: the first k layers keep a dense MLP (DeepSeek's name).
        scoring_func: "softmax" or "sigmoid" router scores.
        norm_topk_prob: renormalise the top-k weights to sum to 1.
        aux_loss_alpha: weight of the balance loss (``out.aux_loss`` is already multiplied by it).
        seq_aux: sequence-level balance loss (DeepSeek-V2/V3); else batch-level (Switch style).
        aux_free_balancing: keep a per-expert bias added to the scores for *selection only*,
            updated by ``model.update_router_bias()`` toward balance (DeepSeek-V3 auxiliary-loss-free).
        bias_update_rate: step of that bias update (``gamma`` in DeepSeek-V3).
        routed_scaling_factor: multiplier of the routed output (DeepSeek's name; 1.0 = none).
    """

    model_type = "mateconv"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = 8,
        intermediate_size: int = 1408,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        hidden_act: str = "silu",
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 3,
        # MoE
        use_moe: bool = False,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        scoring_func: str = "softmax",
        norm_topk_prob: bool = True,
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        aux_free_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        routed_scaling_factor: float = 1.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = intermediate_size if moe_intermediate_size is None else moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.aux_free_balancing = aux_free_balancing
        self.bias_update_rate = bias_update_rate
        self.routed_scaling_factor = routed_scaling_factor
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value) -> None:  # accept configs that spell it out, refuse inconsistent ones
        if value is not None and value != self.hidden_size // self.num_attention_heads:
            raise ValueError("MateConv requires head_dim == hidden_size // num_attention_heads")

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.hidden_act != "silu":
            raise ValueError("MateConv uses SwiGLU (hidden_act='silu')")
        if self.use_moe:
            if self.scoring_func not in ("softmax", "sigmoid"):
                raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError("need 1 <= num_experts_per_tok <= n_routed_experts")
            if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
                raise ValueError("first_k_dense_replace out of range")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.use_moe) and layer_idx >= self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
