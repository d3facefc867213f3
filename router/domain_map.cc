#include "router/domain_map.h"

#include <algorithm>

#include "runtime/base/str_cat.h"

namespace ecss {

StatusOr<DomainMap> DomainMap::Create(uint32_t num_layers) {
  if (num_layers == 0) return InvalidArgumentError("a domain map needs at least one sparse layer");
  return DomainMap(num_layers);
}

Status DomainMap::AddDomain(std::string_view name, uint32_t id,
                            const std::vector<uint32_t>& group_sizes) {
  if (name.empty()) return InvalidArgumentError(StrCat("domain ", id, " has an empty name"));
  if (group_sizes.size() != num_layers_) {
    return InvalidArgumentError(StrCat("domain '", name, "': ", group_sizes.size(),
                                       " group sizes given for ", num_layers_, " sparse layers"));
  }
  for (uint32_t layer = 0; layer < num_layers_; ++layer) {
    if (group_sizes[layer] == 0 || group_sizes[layer] > 65536) {
      return InvalidArgumentError(StrCat("domain '", name, "': group size ", group_sizes[layer],
                                         " in layer ", layer, " is outside [1, 65536]"));
    }
    if (uint64_t{next_expert_[layer]} + group_sizes[layer] > UINT32_MAX) {
      return ResourceExhaustedError(StrCat("layer ", layer, " has no expert indices left"));
    }
  }
  for (const DomainInfo& domain : domains_) {
    if (domain.name == name) {
      return AlreadyExistsError(StrCat("domain name '", name, "' is taken by id ", domain.id));
    }
    if (domain.id == id) {
      return AlreadyExistsError(StrCat("domain id ", id, " is taken by '", domain.name, "'"));
    }
  }
  DomainInfo domain{std::string(name), id, {}};
  for (uint32_t layer = 0; layer < num_layers_; ++layer) {
    domain.groups.push_back(ExpertRange{next_expert_[layer], group_sizes[layer]});
    next_expert_[layer] += group_sizes[layer];
  }
  auto position = std::lower_bound(domains_.begin(), domains_.end(), id,
                                   [](const DomainInfo& d, uint32_t key) { return d.id < key; });
  domains_.insert(position, std::move(domain));
  return Status::Ok();
}

Status DomainMap::AddDomainUniform(std::string_view name, uint32_t id, uint32_t group_size) {
  return AddDomain(name, id, std::vector<uint32_t>(num_layers_, group_size));
}

Status DomainMap::RemoveDomain(uint32_t id) {
  ECSS_ASSIGN_OR_RETURN(size_t index, IndexOf(id));
  domains_.erase(domains_.begin() + static_cast<long>(index));
  return Status::Ok();
}

std::string DomainMap::KnownDomains() const {
  std::string known;
  for (const DomainInfo& domain : domains_) {
    known += StrCat(known.empty() ? "" : ", ", domain.id, " '", domain.name, "'");
  }
  return known.empty() ? "none" : known;
}

StatusOr<uint32_t> DomainMap::IdOf(std::string_view name) const {
  for (const DomainInfo& domain : domains_) {
    if (domain.name == name) return domain.id;
  }
  return NotFoundError(StrCat("unknown domain '", name, "' (known: ", KnownDomains(), ")"));
}

StatusOr<size_t> DomainMap::IndexOf(uint32_t id) const {
  auto it = std::lower_bound(domains_.begin(), domains_.end(), id,
                             [](const DomainInfo& d, uint32_t key) { return d.id < key; });
  if (it == domains_.end() || it->id != id) {
    return NotFoundError(StrCat("unknown domain id ", id, " (known: ", KnownDomains(), ")"));
  }
  return static_cast<size_t>(it - domains_.begin());
}

StatusOr<const DomainInfo*> DomainMap::Find(uint32_t id) const {
  ECSS_ASSIGN_OR_RETURN(size_t index, IndexOf(id));
  return &domains_[index];
}

StatusOr<DomainMap> DomainMap::FromParts(uint32_t num_layers, std::vector<uint32_t> next_expert,
                                         std::vector<DomainInfo> domains) {
  ECSS_ASSIGN_OR_RETURN(DomainMap map, Create(num_layers));
  if (next_expert.size() != num_layers) {
    return InvalidArgumentError(
        StrCat(next_expert.size(), " layer ends for ", num_layers, " layers"));
  }
  map.next_expert_ = std::move(next_expert);
  std::sort(domains.begin(), domains.end(),
            [](const DomainInfo& a, const DomainInfo& b) { return a.id < b.id; });
  for (size_t i = 0; i < domains.size(); ++i) {
    const DomainInfo& domain = domains[i];
    if (domain.name.empty() || domain.groups.size() != num_layers ||
        (i > 0 && domains[i - 1].id == domain.id)) {
      return InvalidArgumentError(StrCat("domain ", domain.id, " is malformed or duplicated"));
    }
    for (uint32_t layer = 0; layer < num_layers; ++layer) {
      const ExpertRange& group = domain.groups[layer];
      if (group.count == 0 || uint64_t{group.first} + group.count > map.next_expert_[layer]) {
        return InvalidArgumentError(StrCat("domain '", domain.name, "' group in layer ", layer,
                                           " lies outside the layer's experts"));
      }
      for (size_t j = 0; j < i; ++j) {
        const ExpertRange& other = domains[j].groups[layer];
        if (group.first < other.first + other.count && other.first < group.first + group.count) {
          return InvalidArgumentError(StrCat("domains '", domain.name, "' and '", domains[j].name,
                                             "' overlap in layer ", layer));
        }
      }
    }
  }
  map.domains_ = std::move(domains);
  return map;
}

}  // namespace ecss
