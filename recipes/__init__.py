"""SegQuant's recipes, one YAML file per model x precision (installed as ``segquant_recipes``).

Read them with ``segquant.recipe.load_recipe("flux.1-dev/int8_w8a8")``.
"""
