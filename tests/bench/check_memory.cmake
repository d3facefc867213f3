# Peak resident memory stays within the session's memory plus a fixed overhead, whatever the
# model's size: runs `ecss-bench step --json` with states and weights on NVMe for a model of 8
# domains and one of 800 (the RRE tables grow with domains x layers x vocabulary) and checks,
# for each, that VmHWM <= device + pinned + host + heap (as planned) + the resident set before
# the suite made anything (the program and its libraries) + 64 MiB (thread stacks, io_uring
# rings, allocator metadata); and that the heap's RRE tables (routing_tables_bytes) grow exactly
# with the domains. Then the same bound for 4 experts of 4 Mi parameters whose initial states are
# written before the run (32 MiB of moments an expert: a block of one outside the session's
# memory would not fit the overhead). Run as:
#   cmake -DBENCH=ecss-bench -DDIR=scratch-dir -P check_memory.cmake
# Runs `ecss-bench step --json` with states and weights on NVMe and the remaining arguments,
# and sets `out` to its "memory" object.
function(step_memory out label)
  execute_process(
    COMMAND "${BENCH}" step --states nvme --weights nvme --dir "${DIR}" ${ARGN} --json
    OUTPUT_VARIABLE text RESULT_VARIABLE failed)
  if(failed)
    message(FATAL_ERROR "ecss-bench step (${label}) failed: ${failed}")
  endif()
  string(JSON memory GET "${text}" memory)
  set(${out} "${memory}" PARENT_SCOPE)
endfunction()

# Fails unless `memory` (the JSON object) has VmHWM within the session's memory, the resident
# set at start and overhead_mib.
function(check_peak label memory)
  set(session 0)
  foreach(field device_bytes pinned_bytes host_bytes heap_bytes)
    string(JSON bytes GET "${memory}" ${field})
    math(EXPR session "${session} + ${bytes}")
  endforeach()
  string(JSON peak GET "${memory}" peak_rss_bytes)
  string(JSON start GET "${memory}" start_rss_bytes)
  if(start LESS_EQUAL 0 OR peak LESS_EQUAL start)
    message(FATAL_ERROR "${label}: no resident set read (start ${start}, peak ${peak})")
  endif()
  math(EXPR over "(${peak} - ${session} - ${start}) / 1048576")
  message(STATUS "${label}: session ${session} bytes, peak RSS ${peak}, at start ${start}: "
                 "${over} MiB beyond both")
  if(over GREATER overhead_mib)
    message(FATAL_ERROR "${label}: peak RSS ${peak} bytes is ${over} MiB beyond the session's "
                        "${session} and the ${start} at start (at most ${overhead_mib})")
  endif()
endfunction()

set(layers 2)
set(overhead_mib 64)
set(heap_per_domain "")
file(MAKE_DIRECTORY "${DIR}")
foreach(domains 8 800)
  step_memory(memory "${domains} domains" --initial-states unwritten --steps 3 --warmup 1
              --d-model 128 --d-ff 256 --layers ${layers} --domains ${domains})
  check_peak("${domains} domains" "${memory}")
  string(JSON heap GET "${memory}" routing_tables_bytes)
  # Each domain's tables: 2 bytes per token and layer, the same for every domain.
  math(EXPR per_domain "${heap} / ${domains}")
  math(EXPR rest "${heap} % (${domains} * ${layers} * 2)")
  if(per_domain EQUAL 0 OR NOT rest EQUAL 0)
    message(FATAL_ERROR "${domains} domains: heap ${heap} bytes is not 2-byte tables of "
                        "${layers} layers per domain")
  endif()
  if(heap_per_domain AND NOT per_domain EQUAL heap_per_domain)
    message(FATAL_ERROR "${domains} domains: ${per_domain} heap bytes a domain, "
                        "${heap_per_domain} with fewer")
  endif()
  set(heap_per_domain ${per_domain})
endforeach()

step_memory(memory "4 Mi-parameter experts" --steps 2 --warmup 1 --d-model 1024 --d-ff 2048
            --layers 1 --domains 4 --experts-per-domain 1)
check_peak("4 Mi-parameter experts, initial states written" "${memory}")
