"""The Gemini text pipeline (docs/policy.md#the-text-pipeline: captions, L1 and L2), as a library the steps and
the CLI use.

    vocabulary   the style-descriptor check and cleaner (pure)
    captions     content-only captions with the trigger word; the check, the re-ask, the cleaning
    profile      L1: 1-10 references (a diverse subset) -> STYLE_PROFILE
    reformulate  L2: STYLE_PROFILE + a user prompt -> a 100-200 word prompt, checked, re-asked once
    client       one structured question: cache, bounded retries, token usage
    providers    the request/answer types and the provider factory; gemini.py (google-genai), openrouter.py (httpx)
    retry, cache the backoff policy (pure) and the answer cache (atomic files)
    commands     `kleinstyle caption | style-profile | reformulate`

Whether generation uses the pipeline is decided in one place, the TrainingPlan (contract.plan, text_pipeline).
"""
