# A Nomad Autoscaler policy for the sandbox pool (the group "sandbox" of the job the executor
# registers, nomad/sandbox.nomad.hcl), for operators who let nomad-autoscaler set the count
# instead of the executor. docs/operations.md ("Who scales the pool") has both ways.
#
# The executor computes the count itself and exports it as the gauge
# atropos_executor_sandboxes_wanted: ceil((leases + waiting calls + headroom) / slots per
# sandbox), never below a sandbox still in use or used within TOOL_EXECUTOR_SCALE_DOWN_IDLE_S
# (a scale-down removes the highest-index allocations; leases go to the lowest first), within
# TOOL_EXECUTOR_MIN_CONTAINERS..MAX_CONTAINERS. The pass-through strategy takes that number
# as the count. With this policy, start the executor with TOOL_EXECUTOR_SCALING=external so
# that the two never scale against each other.
#
# The autoscaler agent needs the Prometheus APM plugin pointed at the Prometheus that scrapes
# the executor (deploy/prometheus/prometheus.yml), and this file in its policy dir:
#
#   apm "prometheus" {
#     driver = "prometheus"
#     config = { address = "http://prometheus.example:9090" }
#   }
#   policy {
#     dir = "/etc/nomad-autoscaler/policies"
#   }
#
# One policy per pool, named by its job id (in the query's job_id and in the target's Job). An
# executor running in a Nomad allocation (nomad/tool-executor.nomad.hcl) owns the pool
# <TOOL_EXECUTOR_JOB_ID>-<alloc index>: atropos-sandbox-tool-executor-0, -1, ... for
# `executors = N`; copy this block for each, with that id.

scaling "atropos-sandbox-tool-executor" {
  enabled = true
  # Keep these equal to TOOL_EXECUTOR_MIN_CONTAINERS / TOOL_EXECUTOR_MAX_CONTAINERS (the job's
  # own scaling block holds the same bounds, and Nomad refuses a count outside them).
  min = 1
  max = 10

  policy {
    # The gauge already holds back a scale-down for the executor's quiet period, and a
    # scale-up should follow waiting calls at once: a short cooldown.
    evaluation_interval = "10s"
    cooldown            = "30s"
    # No answer from Prometheus (the executor not scraped): leave the count as it is.
    on_check_error = "fail"

    check "sandboxes_wanted" {
      source = "prometheus"
      query  = "max(atropos_executor_sandboxes_wanted{job_id=\"atropos-sandbox-tool-executor\"})"

      strategy "pass-through" {}
    }

    target "nomad-target" {
      Namespace = "default"
      Job       = "atropos-sandbox-tool-executor"
      Group     = "sandbox"
    }
  }
}
