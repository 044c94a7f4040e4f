// One line per event on stderr: "time level file:line message". Payloads are
// never logged. The minimum level comes from KVSTRATA_LOG_LEVEL
// (debug|info|warning|error; default info), read once.
#pragma once

#include <sstream>

namespace kvstrata {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

bool LogEnabled(LogLevel level);

class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

}  // namespace kvstrata

#define KVS_LOG(level)                                           \
  if (!::kvstrata::LogEnabled(::kvstrata::LogLevel::k##level)) { \
  } else                                                         \
    ::kvstrata::LogLine(::kvstrata::LogLevel::k##level, __FILE__, __LINE__).stream()
