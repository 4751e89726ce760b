import os, time, torch
def run(family):
    import deepspeed, transformers
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
        m = LlamaForCausalLM(cfg).eval()
    else:
        cfg = OPTConfig(vocab_size=256, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=8,
                        max_position_embeddings=1024, word_embed_proj_dim=128, activation_function="gelu")
        m = OPTForCausalLM(cfg).eval()
    print(m.config._attn_implementation)
    t=time.time()
    eng = deepspeed.init_inference(m, config={"dtype": torch.float32, "tensor_parallel": {"tp_size": int(os.environ["WORLD_SIZE"])}})
    print("init", time.time()-t)
    out = []
    for n, mod in eng.module.named_modules():
        if type(mod).__module__.startswith("deepspeed"):
            out.append((n, type(mod).__name__, tuple(mod.weight.shape)))
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        lg = eng(ids).logits
    g = eng.generate(ids, max_new_tokens=4, do_sample=False)
    return out, lg.shape, g.tolist()
