# Runs `ecss-bench optimizer --states nvme` with SAMPLES rounds in DIR and checks its JSON: one
# fraction of the bound per round, the reported fraction the median of them, rates that are
# positive, and nothing left in DIR. Run as:
#   cmake -DBENCH=FILE -DDIR=DIR -DSAMPLES=N -P check_optimizer_nvme.cmake
file(REMOVE_RECURSE "${DIR}")
file(MAKE_DIRECTORY "${DIR}")
execute_process(
  COMMAND "${BENCH}" optimizer --states nvme --dir "${DIR}" --params 4194304 --samples ${SAMPLES}
          --json
  OUTPUT_VARIABLE text
  RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "ecss-bench optimizer --states nvme exited ${status}")
endif()
string(JSON rounds GET "${text}" rounds)
string(JSON count LENGTH "${text}" fractions)
if(NOT rounds EQUAL SAMPLES OR NOT count EQUAL SAMPLES)
  message(FATAL_ERROR "${SAMPLES} rounds asked for; the run reports ${rounds} and ${count} fractions")
endif()
string(JSON fraction GET "${text}" fraction_of_nvme_bound)
math(EXPR last "${count} - 1")
set(below 0)
set(above 0)
foreach(i RANGE ${last})
  string(JSON f GET "${text}" fractions ${i})
  if(NOT f GREATER 0)
    message(FATAL_ERROR "round ${i}: fraction ${f}")
  endif()
  if(f LESS fraction)
    math(EXPR below "${below} + 1")
  elseif(f GREATER fraction)
    math(EXPR above "${above} + 1")
  endif()
endforeach()
# The median of an odd count: as many rounds below it as above.
if(NOT below EQUAL above)
  message(FATAL_ERROR "fraction ${fraction} is not the median of the rounds' (${below} below, ${above} above)")
endif()
foreach(field updates_per_s nvme_read_gbps nvme_write_gbps wall_s)
  string(JSON value GET "${text}" ${field})
  if(NOT value GREATER 0)
    message(FATAL_ERROR "${field}: ${value}")
  endif()
endforeach()
file(GLOB left "${DIR}/*")
if(left)
  message(FATAL_ERROR "left behind in ${DIR}: ${left}")
endif()
file(REMOVE_RECURSE "${DIR}")
