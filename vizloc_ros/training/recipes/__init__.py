"""Per-method training recipes (loss, samples, preparation), registered under the model
registry's names; importing this package registers every built-in recipe::

    from vizloc_ros.training.recipes import recipe_for
    recipe = recipe_for(model.architecture)
    loss = recipe.loss(model, config)
"""
from vizloc_ros.training.recipes.base import (POSE_LOSS_KEYS, TrainingRecipe, available_recipes, own_loss_options,
                                              recipe_for, register_recipe)
from vizloc_ros.training.recipes import pose as _pose  # noqa: F401  (registers the pose regressors)
from vizloc_ros.training.recipes import dsac as _dsac  # noqa: F401  (registers dsac)
from vizloc_ros.training.recipes import netvlad as _netvlad  # noqa: F401  (registers netvlad)
from vizloc_ros.training.recipes import allocentric as _allocentric  # noqa: F401  (registers allocentric)

__all__ = ["POSE_LOSS_KEYS", "TrainingRecipe", "available_recipes", "own_loss_options", "recipe_for",
           "register_recipe"]
