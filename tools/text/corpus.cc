#include "tools/text/corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

namespace ecss::text {

namespace {

namespace fs = std::filesystem;

struct DomainSource {
  const char* name;
  std::vector<const char*> roots;
  bool (*accept)(const fs::path& path);
  const char* fallback;
};

bool EndsWith(const std::string& s, const char* suffix) {
  const std::string tail(suffix);
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

bool IsHeader(const fs::path& p) { return EndsWith(p.filename().string(), ".h"); }
bool IsPython(const fs::path& p) { return EndsWith(p.filename().string(), ".py"); }
bool IsAnyFile(const fs::path&) { return true; }
bool IsDoc(const fs::path& p) {
  const std::string name = p.filename().string();
  return name.rfind("README", 0) == 0 && !EndsWith(name, ".gz");
}
bool IsCMake(const fs::path& p) { return EndsWith(p.filename().string(), ".cmake"); }

const std::vector<DomainSource>& Sources() {
  static const std::vector<DomainSource> sources = {
      {"c-headers",
       {"/usr/include"},
       IsHeader,
       "#ifndef STDIO_H\n#define STDIO_H\n#include <stddef.h>\nextern int printf(const char "
       "*format, ...);\nextern size_t fread(void *ptr, size_t size, size_t n, FILE *stream);\n"
       "typedef struct { int fd; char *buffer; size_t size; } FILE;\n#endif\n"},
      {"python",
       {"/usr/lib/python3", "/usr/lib/python3.11"},
       IsPython,
       "import os\nimport sys\n\ndef main(argv):\n    for path in argv[1:]:\n        with "
       "open(path) as f:\n            print(len(f.read()))\n    return 0\n\nif __name__ == "
       "'__main__':\n    sys.exit(main(sys.argv))\n"},
      {"licenses",
       {"/usr/share/common-licenses"},
       IsAnyFile,
       "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
       "software, to deal in the Software without restriction. THE SOFTWARE IS PROVIDED AS "
       "IS, WITHOUT WARRANTY OF ANY KIND.\n"},
      {"docs",
       {"/usr/share/doc"},
       IsDoc,
       "This package provides the library and its documentation. To build it, run configure "
       "and make. Report bugs to the maintainers. See the manual for details.\n"},
      {"cmake",
       {"/usr/share/cmake-3.25/Modules"},
       IsCMake,
       "cmake_minimum_required(VERSION 3.25)\nproject(example LANGUAGES CXX)\n"
       "find_package(Threads REQUIRED)\nadd_library(core STATIC core.cc)\n"
       "target_link_libraries(core PUBLIC Threads::Threads)\n"},
  };
  return sources;
}

std::vector<fs::path> ListFiles(const DomainSource& source, uint64_t max_file_bytes) {
  std::vector<fs::path> files;
  for (const char* root : source.roots) {
    std::error_code error;
    if (!fs::is_directory(root, error)) continue;
    fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, error);
    for (; !error && it != fs::recursive_directory_iterator(); it.increment(error)) {
      std::error_code file_error;
      if (!it->is_regular_file(file_error) || file_error) continue;
      if (!source.accept(it->path())) continue;
      const uintmax_t size = it->file_size(file_error);
      if (file_error || size == 0 || size > max_file_bytes) continue;
      files.push_back(it->path());
    }
  }
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  return files;
}

}  // namespace

std::vector<CorpusDomain> LoadMachineCorpus(const CorpusOptions& options) {
  std::vector<CorpusDomain> domains;
  for (const DomainSource& source : Sources()) {
    CorpusDomain domain;
    domain.name = source.name;
    for (const fs::path& path : ListFiles(source, options.max_file_bytes)) {
      if (domain.text.size() >= options.max_bytes_per_domain) break;
      std::ifstream in(path, std::ios::binary);
      if (!in) continue;
      std::ostringstream contents;
      contents << in.rdbuf();
      domain.text += contents.str();
      domain.text += '\n';
      ++domain.files;
    }
    if (domain.files == 0) {
      // Repeat the fallback so that even a bare machine gives a usable corpus.
      for (int i = 0; i < 200; ++i) domain.text += source.fallback;
    }
    domains.push_back(std::move(domain));
  }
  return domains;
}

}  // namespace ecss::text
