"""Typed recipe schemas and the recipe loader.

A recipe is a YAML file whose top-level sections match `Recipe` below. Each component reads its own
section (the model gets `ModelConfig`, the data module `DataConfig`, ...), never the whole recipe.

Loading goes through `OmegaConf.structured(Recipe)` + merge + `to_object`, so an unknown key or a
value of the wrong type fails at load time with one line naming the key and the file. A recipe may
list other recipe files under `defaults:` (paths relative to it), merged first, in order; values may
use omegaconf interpolation (`${model.max_seq_len}`).
"""

from moe.config.check import (  # noqa: F401 (re-exported)
    ConfigError,
    check_finite,
    check_layer,
    explain,
    parse_override,
    read_yaml_mapping,
)
from moe.config.experiments import (  # noqa: F401 (re-exported)
    FleetConfig,
    InitStudyConfig,
    PruneConfig,
    SurgeryStudyConfig,
)
from moe.config.load import (  # noqa: F401 (re-exported)
    load_recipe,
    model_config_from_dict,
    to_dict,
    to_yaml,
    validate,
)
from moe.config.schema import (  # noqa: F401 (re-exported)
    ASSEMBLE_SHARED,
    DEFAULT_ARMS,
    DOMAINS,
    EVAL_PROTOCOLS,
    MODEL_SIZES,
    ROUTER_INITS,
    ROUTERS,
    SCHEDULES,
    SCORINGS,
    SHARED_MODES,
    STAGES,
    STREAMS,
    STUDY_PROTOCOLS,
    TRAINABLE,
    BranchConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    Recipe,
    RopeScalingConfig,
    RouterTrainConfig,
    SourceConfig,
    StudyConfig,
    SweepConfig,
    TrainerConfig,
    check_router_options,
)
