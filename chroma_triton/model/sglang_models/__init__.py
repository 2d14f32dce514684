"""External SGLang model package (``SGLANG_EXTERNAL_MODEL_PACKAGE=chroma_triton.model.sglang_models``).

SGLang imports every module here and registers each module's ``EntryClass`` under its class name,
which must equal ``architectures[0]`` of the config it loads (`sglang_thinker.prepare_model_dir`
writes that config). Nothing here is imported outside SGLang's scheduler process, and this file
imports nothing, so the package costs nothing where SGLang is absent.
"""
