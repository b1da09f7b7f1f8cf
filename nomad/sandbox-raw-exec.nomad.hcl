# The sandbox pool for Nomad clients without Docker: the raw_exec driver runs the sandbox
# server straight on the host. Same job as nomad/sandbox.nomad.hcl otherwise; the executor
# registers it itself with TOOL_EXECUTOR_NOMAD_DRIVER=raw_exec (atropos_agent/executor/backends/nomad_job.py).
#
# What the clients need (docs/operations.md, "Hosts without Docker"):
#   - raw_exec enabled:  plugin "raw_exec" { config { enabled = true } }
#   - bubblewrap, procps and a system python3 (/usr/bin/python3): apt-get install bubblewrap procps python3
#   - this package installed for the interpreter named in `command`
#   - the Nomad agent running as root, so that each slot gets its own host uid
#
# raw_exec gives no isolation of its own: bubblewrap in each slot is the only boundary between
# commands and the host. Keep ATROPOS_SANDBOX_ISOLATION = "bwrap".

variable "command" {
  type = string
  # Nomad finds a bare name on the agent's own $PATH; its docs ask for an absolute path, e.g.
  # "/opt/atropos/venv/bin/python" (the interpreter that has this package installed).
  # TOOL_EXECUTOR_NOMAD_RAW_EXEC_COMMAND.
  default = "python3"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "min_containers" {
  type    = number
  default = 1
}

variable "max_containers" {
  type    = number
  default = 10
}

variable "slots" {
  type    = number
  default = 10
}

variable "allow_network" {
  type    = bool
  default = true
}

variable "cpu_mhz" {
  type    = number
  default = 1000
}

variable "memory_mb" {
  type    = number
  default = 4096
}

variable "service_name" {
  type    = string
  default = "atropos-sandbox"
}

job "atropos-sandbox-tool-executor" {
  type        = "service"
  datacenters = var.datacenters

  group "sandbox" {
    count = var.min_containers

    scaling {
      enabled = true
      min     = var.min_containers
      max     = var.max_containers
    }

    # No deployments, so that one scale never blocks the next (see sandbox.nomad.hcl).
    update {
      max_parallel = 0
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "fail"
    }

    reschedule {
      attempts       = 0
      delay          = "5s"
      delay_function = "exponential"
      max_delay      = "2m"
      unlimited      = true
    }

    network {
      mode = "host"

      # No port mapping without a container: the server binds the port Nomad picked, which it
      # reads from NOMAD_PORT_http.
      port "http" {}
    }

    service {
      name     = var.service_name
      port     = "http"
      provider = "nomad"

      check {
        name     = "sandbox-health"
        type     = "http"
        path     = "/health"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "sandbox-server" {
      driver = "raw_exec"

      config {
        command = var.command
        args    = ["-m", "atropos_agent.sandbox"]
      }

      env {
        ATROPOS_SANDBOX_HOST               = "0.0.0.0"
        ATROPOS_SANDBOX_SLOTS              = "${var.slots}"
        ATROPOS_SANDBOX_ALLOW_NETWORK      = "${var.allow_network}"
        ATROPOS_SANDBOX_MEMORY_MB          = "2048"
        ATROPOS_SANDBOX_MAX_PROCESSES      = "256"
        ATROPOS_SANDBOX_MAX_OUTPUT_BYTES   = "65536"
        ATROPOS_SANDBOX_MAX_FILE_BYTES     = "5242880"
        ATROPOS_SANDBOX_DISK_MB            = "1024"
        ATROPOS_SANDBOX_MAX_REQUEST_BYTES  = "33554432"
        ATROPOS_SANDBOX_ISOLATION          = "bwrap"
        ATROPOS_SANDBOX_SLOT_UID_BASE      = "200000"
        ATROPOS_SANDBOX_TERMINAL_OUTPUT    = "split"
        ATROPOS_SANDBOX_JOB_TIMEOUT_S      = "300"
        ATROPOS_SANDBOX_UPLOAD_MAX_MB      = "1024"
        ATROPOS_SANDBOX_UPLOAD_MAX_ENTRIES = "200000"
        ATROPOS_SANDBOX_LAYER_CACHE_MB     = "8192"
        ATROPOS_SANDBOX_WORKSPACE_LAYERS   = "auto"
        ATROPOS_SANDBOX_WARM_SLOTS         = "32"
      }

      # The shared token, from the Nomad Variable the executor keeps (see sandbox.nomad.hcl).
      template {
        data        = <<-EOT
          ATROPOS_SANDBOX_TOKEN={{ with nomadVar "nomad/jobs/atropos-sandbox-tool-executor" }}{{ .sandbox_token }}{{ end }}
        EOT
        destination = "secrets/sandbox.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = var.cpu_mhz
        memory = var.memory_mb
      }

      kill_timeout = "15s"
    }
  }
}
