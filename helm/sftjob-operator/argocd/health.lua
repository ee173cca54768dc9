-- Argo CD health check for sft.tuning.dev/SFTJob (argocd-cm key:
-- resource.customizations.health.sft.tuning.dev_SFTJob). Lua 5.1, as Argo CD's gopher-lua VM runs it.
-- What each result means and why: docs/gitops.md. Tested against statuses captured from real runs of
-- the operator (tests/gitops/).
--
--   no status yet / spec not yet observed              Progressing
--   Pending, Curating, Training, Aligning,
--   Evaluating, Merging                                Progressing   (reason, message, progress)
--   ... with condition Stuck=True                      Degraded      (the cause; Progressing once pods start)
--   Suspended                                          Suspended
--   Succeeded                                          Healthy
--   Failed                                             Degraded      (reason and message)
--   anything else                                      Unknown
local function health(status, message)
  return { status = status, message = message }
end

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(head, reason, message)
  local text = head
  if reason ~= nil and reason ~= "" then
    text = text .. " (" .. reason .. ")"
  end
  if message ~= nil and message ~= "" then
    text = text .. ": " .. message
  end
  return text
end

local status = obj.status
if status == nil or status.phase == nil or status.phase == "" then
  return health("Progressing", "Waiting for the SFTJob operator to pick up the run")
end
local phase = status.phase

-- Terminal phases are final: the operator never leaves them, whatever the spec says later.
if phase == "Succeeded" then
  return health("Healthy", describe(phase, nil, status.message))
end
if phase == "Failed" then
  return health("Degraded", describe(phase, status.reason, status.message))
end

-- A spec change (e.g. spec.suspend) the operator has not acted on yet: the status describes the past.
local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  return health("Progressing", "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (status is from generation " .. tostring(observed) .. "): " .. describe(phase, status.reason, nil))
end

if phase == "Suspended" then
  return health("Suspended", describe(phase, status.reason, status.message))
end

if phase == "Pending" or phase == "Curating" or phase == "Training" or phase == "Aligning"
    or phase == "Evaluating" or phase == "Merging" then
  -- Stuck: pods Pending past runPolicy.stuckPendingTimeoutSeconds (unschedulable, image pull, quota).
  -- Nothing moves without a person, so Degraded, like a Deployment past its progress deadline.
  local stuck = condition(status, "Stuck")
  if stuck ~= nil and stuck.status == "True" then
    return health("Degraded", describe("Stuck in " .. phase, stuck.reason, stuck.message))
  end
  local message = describe(phase, status.reason, status.message)
  if status.progress ~= nil and status.progress.summary ~= nil then
    message = message .. "; step " .. status.progress.summary
  end
  return health("Progressing", message)
end

return health("Unknown", "Unknown SFTJob phase " .. tostring(phase))
