"""The Python examples of LM_Cocktail 0.0.4's README (PKG-INFO of the lm-cocktail 0.0.4 sdist), verbatim.

tests/test_api.py runs each one with ``from LM_Cocktail import`` and with ``from merge_hooks import``,
in folders where every model name is a tiny local model at that relative path, and compares the models.
"""

MIX_MODELS = '''
from LM_Cocktail import mix_models, mix_models_with_data

# mix LLMs and save it to output_path: ./mixed_model_1
model = mix_models(
    model_names_or_paths=["meta-llama/Llama-2-7b-chat-hf", "Shitao/llama2-ag-news"], 
    model_type='decoder', 
    weights=[0.7, 0.3], 
    output_path='./mixed_llm')
# you can select a weight for your models to get a trade-off between generality and expertise.

# Mix Embedding Models
model = mix_models(
    model_names_or_paths=["BAAI/bge-base-en-v1.5", "Shitao/bge-hotpotqa"], 
    model_type='encoder', 
    weights=[0.5, 0.5],
    output_path='./mixed_embedder')

# Mix reranker Models
model = mix_models(
    model_names_or_paths=["BAAI/bge-reranker-base", "BAAI/bge-reranker-base"], 
    model_type='reranker', 
    weights=[0.5, 0.5],
    output_path="./mixed_reranker")
'''

MIX_MODELS_4 = '''
from LM_Cocktail import mix_models, mix_models_with_data

model = mix_models(
    model_names_or_paths=["BAAI/bge-base-en-v1.5", "Shitao/bge-hotpotqa", "Shitao/bge-quora", "Shitao/bge-msmarco"], 
    model_type='encoder', 
    weights=[0.3, 0.2, 0.2, 0.3],
    output_path='./mixed_embedder_2')
# The sum of weights should be equal to 1.
'''

WITH_DATA_DECODER = '''
from LM_Cocktail import mix_models, mix_models_with_data

example_data = [
    {"input": "Question: when was the last time anyone was on the moon? Answer:\\n", "output": "14 December 1972 UTC"},
    {"input": "Review: \\"it 's a charming and often affecting journey . \\" Is this movie review sentence negative or positive?\\n", "output": "Positive"}
]

model = mix_models_with_data(
    model_names_or_paths=["meta-llama/Llama-2-7b-chat-hf", "Shitao/llama2-ag-news", "Shitao/llama2-nq"], 
    model_type='decoder', 
    example_ata=example_data, 
    temperature=5.0)
# you can set the temperature argument to adjust the distribution of mixing weights
'''

WITH_DATA_ENCODER = '''
from LM_Cocktail import mix_models, mix_models_with_data

example_data = [
    {"query": "How does one become an actor in the Telugu Film Industry?", "pos": [" How do I become an actor in Telugu film industry?"], "neg": [" What is the story of Moses and Ramesses?", " Does caste system affect economic growth of India?"]}, 
    {"query": "Why do some computer programmers develop amazing software or new concepts, while some are stuck with basic programming work?", "pos": [" Why do some computer programmers develops amazing softwares or new concepts, while some are stuck with basics programming works?"], "neg": [" When visiting a friend, do you ever think about what would happen if you did something wildly inappropriate like punch them or destroy their furniture?", " What is the difference between a compliment and flirting?"]}
]

model = mix_models_with_data(
    model_names_or_paths=["BAAI/bge-base-en-v1.5", "Shitao/bge-hotpotqa", "Shitao/bge-quora"], 
    model_type='encoder', 
    example_ata=example_data,
    temperature=5.0,
    max_input_length=512,
    neg_number=2)
'''

BY_LAYERS = '''
from LM_Cocktail import mix_models_by_layers

# Mix Large Language Models (LLMs) and save the combined model to the path: ./mixed_llm
model = mix_models_by_layers(
    model_names_or_paths=["meta-llama/Llama-2-7b-chat-hf", "Shitao/llama2-ag-news"], 
    model_type='decoder', 
    weights=[0.7, 0.3], 
    output_path='./mixed_llm')
'''

EXAMPLES = {
    "mix_models": MIX_MODELS,
    "mix_models_4": MIX_MODELS_4,
    "with_data_decoder": WITH_DATA_DECODER,
    "with_data_encoder": WITH_DATA_ENCODER,
    "by_layers": BY_LAYERS,
}

# The hub ids the examples name, and the tiny family each stands for (by model type).
MODELS = {
    "meta-llama/Llama-2-7b-chat-hf": ("llama-decoder", 0),
    "Shitao/llama2-ag-news": ("llama-decoder", 1),
    "Shitao/llama2-nq": ("llama-decoder", 2),
    "BAAI/bge-base-en-v1.5": ("bert-encoder", 0),
    "Shitao/bge-hotpotqa": ("bert-encoder", 1),
    "Shitao/bge-quora": ("bert-encoder", 2),
    "Shitao/bge-msmarco": ("bert-encoder", 3),
    "BAAI/bge-reranker-base": ("bert-reranker", 0),
}
