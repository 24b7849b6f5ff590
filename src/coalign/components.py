"""Import every module that registers a part, so the registries are complete.

Adding a part is one new file plus one line here.
"""

import coalign.data.sources.csv  # noqa: F401
import coalign.data.sources.folder  # noqa: F401
import coalign.data.sources.jsonl  # noqa: F401
import coalign.data.transforms.image  # noqa: F401
import coalign.data.transforms.text  # noqa: F401
import coalign.data.world  # noqa: F401
import coalign.evaluate.suite  # noqa: F401
import coalign.models.encoders.text  # noqa: F401
import coalign.models.encoders.vit  # noqa: F401
import coalign.models.heads  # noqa: F401
import coalign.objectives.contrastive  # noqa: F401
