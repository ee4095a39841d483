-- Argo CD health of a kleinstyle resource (StyleBoard, StyleLoRA, GenerationJob, LoRAFusion), from the status the
-- operator writes: Healthy once it succeeded, Degraded when it failed or is stalled (it will not progress until
-- someone changes something), Suspended while Kueue holds its Job in a queue (a preempted one included),
-- Progressing otherwise (waiting for a dependency, pending, running, or a spec the operator has not seen yet). Install it in argocd-cm as
-- resource.customizations.health.kleinstyle.dev_<Kind> for each of the four kinds (charts/kleinstyle/README.md).
local health = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil then
  return health
end
if obj.status.observedGeneration ~= obj.metadata.generation then
  health.message = "the operator has not seen this spec yet"
  return health
end
health.message = obj.status.message or ""
local conditions = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  conditions[condition.type] = condition
end
-- Kueue holds the Job: waiting for quota, or evicted (preempted) and requeued.
local queued = { Queued = true, Preempted = true, Evicted = true }
local function is_true(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end
if obj.status.phase == "Succeeded" and is_true("Ready") then
  health.status = "Healthy"
elseif obj.status.phase == "Failed" or is_true("Stalled") then
  health.status = "Degraded"
elseif conditions["Ready"] ~= nil and queued[conditions["Ready"].reason] then
  health.status = "Suspended"
end
return health
