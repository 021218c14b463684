-- Argo CD health of every medplum.com kind, from its kstatus conditions.
-- Healthy: Ready=True for the current generation (a ClientApplication stays Ready while it rotates).
-- Progressing: not reconciled yet, an older generation, being deleted, or Reconciling=True (waiting
-- for Medplum, a rate limit, a connection or a policy: waiting cures it).
-- Degraded: Stalled=True, a refusal that only a change of the spec or of the platform's limits cures.
-- Runs without Lua's string library, as scripts from argocd-cm do.
local hs = { status = "Progressing", message = "Waiting for the operator to reconcile it" }
if obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted: the operator is removing what it made in Medplum"
  return hs
end
local status = obj.status
if status == nil or status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end
local found = {}
for _, condition in ipairs(status.conditions) do
  found[condition.type] = condition
end
local function said(condition)
  return condition.reason .. ": " .. (condition.message or "")
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(found.Stalled)
  return hs
end
local ready = found.Ready
if ready ~= nil and ready.status == "True" and (ready.observedGeneration == nil or ready.observedGeneration == generation) then
  hs.status = "Healthy"
  hs.message = ready.message or ""
  return hs
end
if found.Reconciling ~= nil and found.Reconciling.status == "True" then
  hs.message = said(found.Reconciling)
  return hs
end
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = said(ready)
end
return hs
